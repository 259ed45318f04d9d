# A larger pycode target on one GPU (bf16 autocast).
# python data/pycode/prepare.py && python train.py config/train_pycode_gpu.py
out_dir = "out-pycode-gpu"
dataset = "pycode"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
eval_interval = 500
max_new_tokens = 128
compile = True
