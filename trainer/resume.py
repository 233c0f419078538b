"""Which run to train: a new one, `--resume [RUN_ID]`, or after a torchrun restart the run this
job created; which options a resume may change; and the command that resumes."""

import argparse
import os
from pathlib import Path

from trainer import TrainerError
from trainer.run import RunDir

# Options a resumed run may change: --epochs (the one-cycle schedule is re-planned over the
# new total), and where things are read or written, which does not change the result.
# Every other option is part of the run and must stay as the run's config.json has it.
CHANGEABLE = ("epochs", "models_dir", "runs_dir", "download_dir", "cache_dir", "decode_workers")


def torchrun_job() -> str | None:
    """torchrun's job id (--rdzv-id, random with --standalone): one per job, kept on restarts."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def is_restart() -> bool:
    """True when torchrun restarted the workers (--max-restarts) after one of them failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def resume_command(run_id: str) -> str:
    """The command that continues run_id, as the user started the trainer."""
    # The image sets TRAINER_COMMAND to its compose command (the CPU override adds its -f files).
    command = os.environ.get("TRAINER_COMMAND")
    nproc = os.environ.get("TRAINER_NPROC", "1")
    if command and nproc != "1":
        command = f"TRAINER_NPROC={nproc} {command}"
    if not command:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        command = "torchrun [the same options] -m trainer" if distributed else "python -m trainer"
    return f"{command} --resume {run_id}"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def apply_resume_options(config: dict, done: int, args: argparse.Namespace) -> dict:
    """The run's config updated with the options given now; TrainerError naming any that a
    resume cannot change. An option given with the run's own value is fine."""
    now = {dest: getattr(args, dest) for dest in args.given if dest in config}
    if "data_dir" in now:
        now["data_dir"] = str(Path(now["data_dir"]).resolve()) if now["data_dir"] else ""
    changed = {dest: value for dest, value in now.items() if value != config[dest]}
    refused = [f"{_flag(d)} {v} (run: {config[d]})" for d, v in changed.items()]
    refused = [r for r, d in zip(refused, changed, strict=True) if d not in CHANGEABLE]
    if refused:
        raise TrainerError(
            f"run {config['run_id']} keeps its own options; a resume cannot change "
            f"{', '.join(refused)} (drop them, or start a new run)"
        )
    if changed.get("epochs", done) < done:
        raise TrainerError(
            f"--epochs {changed['epochs']}: run {config['run_id']} already completed {done} epochs"
        )
    return {**config, **changed}


def fresh_config(args: argparse.Namespace, keys: list[str]) -> dict:
    """A new run's config: the options named by keys, but where it runs (--device)."""
    config = {k: getattr(args, k) for k in keys if k != "device"}
    config["data_dir"] = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    config["torchrun_job"] = torchrun_job()
    return config


def start_run(args: argparse.Namespace, run_id: str | None, config: dict) -> str:
    """Rank 0: create the run folder of a new run (or reopen a resumed one), write config.json."""
    run = RunDir(Path(args.runs_dir) / run_id) if run_id else RunDir.create(args.runs_dir)
    config["run_id"] = run.run_id
    run.write_config(config)
    return run.run_id


def plan_run(args: argparse.Namespace, keys: list[str]) -> dict:
    """Rank 0's choice, given to every rank: {"run_id", "config", "state"}; "run_id" None for a
    new run (created once the data is loaded), "finished" for a restart after the end. keys:
    the options a config records."""
    runs_dir = Path(args.runs_dir)
    job = torchrun_job()
    run = RunDir.newest_of_job(runs_dir, job) if job and is_restart() else None
    if run is not None and run.finished:
        # A rank failed after the run published: nothing is left to do.
        return {"run_id": run.run_id, "finished": run.read_result()}
    if run is None and args.resume:
        run = RunDir.find_unfinished(runs_dir, None if args.resume == "newest" else args.resume)
    if run is None:
        return {"run_id": None, "config": fresh_config(args, keys), "state": None}
    state = run.load_state()
    config = apply_resume_options(run.read_config(), state["epoch"] if state else 0, args)
    config["torchrun_job"] = job  # a restart of this job finds this run again
    return {"run_id": run.run_id, "config": config, "state": state}
