# The arith target on a CPU, train.py's defaults written
# out; block_size=128 is what train.py derives from data/arith by itself (95% of records fit in 97).
# python train.py config/train_arith.py
out_dir = "out-arith"
dataset = "arith"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
max_iters = 6000
learning_rate = 3e-3
min_lr = 3e-4
