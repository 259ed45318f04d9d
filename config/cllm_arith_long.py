# A longer distillation of the default arith target: 4000 iterations instead of 2200.
# python train_cllm.py config/cllm_arith_long.py
out_dir = "out-cllm-arith-long"
max_iters = 4000
eval_interval = 500
