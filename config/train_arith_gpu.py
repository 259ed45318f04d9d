# A larger arith target on one GPU (bf16 autocast): 6 layers, 384 wide, ~11M parameters.
# python train.py config/train_arith_gpu.py
out_dir = "out-arith-gpu"
dataset = "arith"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 128
batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
eval_interval = 500
compile = True
