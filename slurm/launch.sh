# TrinityX-DS: what every job of the pipeline shares. Sourced by the .sbatch files rendered next
# to it (`trinityx slurm render` fills the settings in); the rest is plain bash.

PY={{PYTHON|q}}                 # the python of the venv (or container) that has trinityx_ds
LAUNCHER={{LAUNCHER|q}}         # torchrun: one srun task per node; srun: one task per process
PROCS_PER_NODE={{PROCS_PER_NODE}}
GPUS_PER_NODE={{GPUS_PER_NODE_OR_0}}
RUN_DIR={{RUN_DIR|q}}           # the run config's output.dir

# --- containers (enroot + pyxis): set container_image in the Slurm settings, or here.
#     The image must hold the same venv path as PY above (or set python: to the image's).
CONTAINER_IMAGE={{CONTAINER_IMAGE|q}}       # e.g. nvcr.io#nvidia/pytorch:24.05-py3 or /shared/trinityx.sqsh
CONTAINER_MOUNTS={{CONTAINER_MOUNTS|q}}     # e.g. /lustre:/lustre,$HOME:$HOME
CONTAINER_ARGS=()
if [ -n "$CONTAINER_IMAGE" ]; then
  CONTAINER_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD")
  [ -n "$CONTAINER_MOUNTS" ] && CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
  # CONTAINER_ARGS+=(--no-container-mount-home --container-remap-root)
fi

# --- network knobs a real cluster usually needs (uncomment and adapt):
# export NCCL_SOCKET_IFNAME=ib0,eth0       # interfaces NCCL bootstraps over (not lo / docker0)
# export GLOO_SOCKET_IFNAME=eth0           # the same for gloo (CPU jobs, DeepSpeed's CPU groups)
# export NCCL_IB_HCA=mlx5_0,mlx5_1         # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3               # RoCE
# export NCCL_NET_GDR_LEVEL=PHB            # GPUDirect RDMA
# export NCCL_DEBUG=WARN                   # INFO when a job hangs at start-up
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 # a dead rank ends the job instead of hanging it (torch's current name)
# export TORCH_NCCL_BLOCKING_WAIT=0
# export TORCH_EXTENSIONS_DIR=/shared/cache/torch_extensions   # DeepSpeed ops built once, shared
# export HF_HOME=/shared/cache/hf

# --- no GPU asked for: DeepSpeed's CPU accelerator and gloo. GPUs asked for but none seen: stop,
#     rather than train a GPU job on CPU without a word
if [ "$GPUS_PER_NODE" = 0 ]; then
  export {{CPU_ENV}}
elif ! nvidia-smi -L >/dev/null 2>&1 && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "job $SLURM_JOB_ID asked for $GPUS_PER_NODE GPU(s) per node, but $(hostname) shows none" \
       "(nvidia-smi and torch.cuda both fail): stopping instead of running on CPU" >&2
  exit 1
else
  # megatron overlaps its TP all-reduce / reduce-scatter with the GEMMs only with one hardware queue
  [ "{{TP}}" -gt 1 ] && export CUDA_DEVICE_MAX_CONNECTIONS=1
fi
# srun inside the batch script does not inherit --cpus-per-task (Slurm >= 22.05): pass it on
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
# --- the Slurm settings' `env` (after the CPU defaults, so it can override them)
{{ENV_EXPORTS}}

# --- rendezvous: the first node of the job; a port of the job's own (jobs may share nodes)
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT={{PORT_OR_AUTO}}

echo "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}: nodes ${NODES[*]}," \
     "restart ${SLURM_RESTART_COUNT:-0}, launcher $LAUNCHER, $(date -Is)"

# Each task first logs its host, and ignores SIGUSR1 until the run installs its own handler
# (a torchrun agent keeps ignoring it: Slurm's --signal reaches every process of a step, and
# only the workers must act on it: they finish the step, checkpoint and exit 0).
TASK='trap "" USR1; echo "task ${SLURM_PROCID}/${SLURM_NTASKS} on $(hostname)"; exec "$@"'

launch() {  # MODULE ARGS...: python -m MODULE on every process of the job
  if [ "$LAUNCHER" = torchrun ]; then  # (a) one task per node, torchrun starts the processes
    srun "${CONTAINER_ARGS[@]}" --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "$TASK" task \
      "$PY" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$PROCS_PER_NODE" \
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
      -m "$@"
  else  # (b) one task per process; trinityx reads SLURM_PROCID/NTASKS/LOCALID (env://)
    srun "${CONTAINER_ARGS[@]}" --kill-on-bad-exit=1 bash -c "$TASK" task "$PY" -m "$@"
  fi
}

run_once() {  # MODULE ARGS...: one process (export)
  run_tasks 1 "$@"
}

run_tasks() {  # N MODULE ARGS...: N processes, one srun task each (eval at the run's TP)
  local n=$1
  shift
  srun "${CONTAINER_ARGS[@]}" --kill-on-bad-exit=1 --ntasks="$n" bash -c "$TASK" task "$PY" -m "$@"
}

# Training jobs: `train_stage DONE_FILE CKPT_DIR MODULE ARGS...`. The run handles USR1/TERM by
# checkpointing and returning early (exit 0). So: the stage's final output present -> done;
# missing but the checkpoint moved on -> preempted: requeue this job, which resumes from that
# checkpoint by itself; missing and no progress -> fail (no endless requeue loop).
train_stage() {
  local done_file=$1 ckpt=$2 before after
  shift 2
  before=$(cat "$ckpt/latest" 2>/dev/null || true)
  launch "$@"
  if [ -f "$done_file" ]; then
    echo "finished: $done_file"
    return 0
  fi
  after=$(cat "$ckpt/latest" 2>/dev/null || true)
  if [ -z "$after" ] || [ "$after" = "$before" ]; then
    echo "stopped without finishing and without a new checkpoint in $ckpt: not requeueing" >&2
    exit 1
  fi
  echo "preempted at $after: requeueing job $SLURM_JOB_ID (it resumes from $ckpt/$after)"
  for _ in 1 2 3 4 5; do  # a busy slurmctld may drop a request: retry before giving up
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    sleep 5
  done
  echo "scontrol requeue failed: resubmit this job to resume from $ckpt/$after" >&2
  exit 1
}
