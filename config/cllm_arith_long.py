# A longer distillation of the arith target: 2000 iterations, about 15 minutes on 2 cores.
# python train_cllm.py config/cllm_arith_long.py
out_dir = "out-cllm-arith-long"
target_dir = "out-arith"
max_iters = 2000
eval_interval = 500
