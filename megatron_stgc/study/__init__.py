"""``megatron-stgc study``: seed-paired studies over a grid of flags (docs/STUDY.md, "The tool").

A grid file (YAML) names a base config, the points (flag axes and named points), the seeds
and the stages as commands (once: e.g. data + stage II; per run: e.g. stage III + eval).
``--launcher local`` runs them here with torchrun, ``--launcher slurm`` writes one sbatch
script per run plus a collect job; the collect step aggregates the run directories into
runs.csv / summary.csv (seed-paired differences to a baseline with 95% t-intervals) and plots.

Modules: grid_file (reading the YAML), points (axes, points, baselines), templates (command
placeholders), plan (the jobs and their steps), local / slurm (the launchers), collect (one
row per run), stats (paired intervals), report (CSVs, text, figures), cli (the command).
"""
