# Sourced by the sbatch templates on every node before `srun`: software, threads, diagnostics.
# Edit the first block for your cluster.

# ---- software ------------------------------------------------------------------------------
if [ -n "${LLMKIT_VENV:-}" ]; then source "$LLMKIT_VENV/bin/activate"; fi   # e.g. LLMKIT_VENV=$HOME/llmkit/.venv
# module load cuda/12.4   # site modules, if your cluster uses them

# ---- rendezvous: rank 0's node and a port derived from the job id (exported, so NCCL/gloo tools
# and logs see them). The port stays below Linux's ephemeral range (32768+): a rank connecting to a
# port in that range before rank 0 listens can be given it as its own source port. ------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 17000))
export MASTER_ADDR MASTER_PORT

# ---- threads: each task is one rank; split the node's cores between them --------------------
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# ---- diagnostics switches (LLMKIT_DEBUG_DIST=1 to turn on) -----------------------------------
if [ "${LLMKIT_DEBUG_DIST:-0}" = 1 ]; then
  export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET   # which interfaces/transports NCCL picked
  export TORCH_DISTRIBUTED_DEBUG=DETAIL               # mismatched collectives name the culprit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1            # fail instead of hanging on a dead peer
  export GLOO_LOG_LEVEL=DEBUG
fi
# export NCCL_SOCKET_IFNAME=ib0   # pin the network interface if NCCL picks the wrong one
echo "[llmkit] job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $SLURM_NTASKS_PER_NODE task(s), master $MASTER_ADDR:$MASTER_PORT"
