# A longer distillation of the arith target: 2000 iterations (28 minutes on 1 thread of machine A).
# python train_cllm.py config/cllm_arith_long.py
out_dir = "out-cllm-arith-long"
target_dir = "out-arith"
max_iters = 2000
eval_interval = 500
