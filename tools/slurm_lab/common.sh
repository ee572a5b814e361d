# Sourced by up.sh / down.sh: where the lab lives and what it is called.
#   SLURM_LAB_DIR  the lab folder (config, state, logs, command wrappers)
#   SLURM_LAB_NS   prefix of its network namespaces and veth pair (<= 10 characters)
# Two labs with different folders and prefixes run side by side (each node's addresses and
# ports exist only inside that lab's namespaces).
LAB=${SLURM_LAB_DIR:-/tmp/trinityx-slurm-lab}
NS=${SLURM_LAB_NS:-txlab}
NS1=${NS}-n1
NS2=${NS}-n2
# munged wants every folder above its socket traversable by all (a pytest tmp folder is not):
# its socket, key and seed live under /run instead.
MUNGE=/run/trinityx-slurm-lab-$NS
MARK=.trinityx-slurm-lab  # down.sh only removes a folder that up.sh made
SLURM_CMDS=(sbatch squeue scontrol scancel sinfo srun salloc sattach sprio sstat)
