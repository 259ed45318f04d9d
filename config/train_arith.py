# The default target: arith on a laptop CPU (2 cores), about 7 minutes. Same as train.py's defaults.
# python train.py config/train_arith.py
out_dir = "out-arith"
dataset = "arith"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
max_iters = 1500
learning_rate = 3e-3
min_lr = 3e-4
