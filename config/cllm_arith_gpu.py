# Distil the GPU arith target (config/train_arith_gpu.py) on one GPU, bf16 autocast.
# python train.py config/train_arith_gpu.py && python train_cllm.py config/cllm_arith_gpu.py
out_dir = "out-cllm-arith-gpu"
target_dir = "out-arith-gpu"
num_prompts = 20000
collect_batch = 256
batch_size = 64
max_iters = 3000
learning_rate = 3e-4
min_lr = 3e-5
eval_interval = 500
