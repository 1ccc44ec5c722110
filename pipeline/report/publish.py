"""Publish a run's final model with its card, metrics and plots to the Hugging Face Hub.

    python -m pipeline.report.publish RUN_DIR --repo user/name [--private]     (make publish RUN=... REPO=...)
    python -m pipeline.report.publish RUN_DIR --dry-run OUT_DIR                (writes exactly what would go up)

Model files sit at the repo root (so `AutoModelForCausalLM.from_pretrained("user/name")` works),
the model card is README.md, and the run's metrics, evaluations and plots go under `training/`.
Nothing is uploaded without an explicit repo and a token (HF_TOKEN or --token).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

TRAINING_FILES = (
    "metrics.jsonl",
    "eval_before.json",
    "eval_after.json",
    "eval_after.jsonl",
    "config.yaml",
    "run_info.json",
    "completions.jsonl",
    *(f"{n}_curves.png" for n in ("reward", "format", "health", "eval")),
)


class PublishError(RuntimeError):
    pass


def stage(run_dir: Path, out_dir: Path) -> list[str]:
    """Copy what would be uploaded into `out_dir`; returns the relative paths."""
    final = run_dir / "final"
    if not (final / "config.json").exists():
        raise PublishError(f"{run_dir}: no final model in {final} (did the run finish?)")
    if not (run_dir / "README.md").exists():
        from pipeline.report.card import write_report

        write_report(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for path in sorted(final.iterdir()):
        if path.is_file():
            shutil.copy2(path, out_dir / path.name)
            files.append(path.name)
    card = (run_dir / "README.md").read_text()
    # the card's images live under training/ in the repo
    for png in (n for n in TRAINING_FILES if n.endswith(".png")):
        card = card.replace(f"]({png})", f"](training/{png})")
    (out_dir / "README.md").write_text(card)
    files.append("README.md")
    (out_dir / "training").mkdir(exist_ok=True)
    for name in TRAINING_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out_dir / "training" / name)
            files.append(f"training/{name}")
    return files


def upload(folder: Path, repo: str, token: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo,
        repo_type="model",
        commit_message="Upload GRPO-trained model, card and training metrics",
    )
    return str(getattr(info, "commit_url", repo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report.publish", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", help="a finished run directory (runs/<name>)")
    parser.add_argument("--repo", help="Hub repo id, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="Hub token (default: the HF_TOKEN environment variable)")
    parser.add_argument(
        "--dry-run", metavar="OUT_DIR", help="write what would be uploaded here; upload nothing"
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if args.dry_run:
            files = stage(run_dir, Path(args.dry_run))
            print(f"dry run: {len(files)} files in {args.dry_run} (nothing uploaded)")
            return 0
        if not args.repo or "/" not in args.repo:
            raise PublishError("--repo user/name is required to upload (or use --dry-run OUT_DIR)")
        token = args.token or os.environ.get("HF_TOKEN")
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or pass --token (nothing was uploaded)")
        with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
            stage(run_dir, Path(tmp))
            print(f"uploaded: {upload(Path(tmp), args.repo, token, args.private)}")
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network, auth, hub errors: one line, not a traceback
        print(f"error: upload to {args.repo} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
