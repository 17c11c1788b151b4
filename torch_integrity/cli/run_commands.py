"""Commands about one run directory: verify, replay, log, rollback, check-weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch_integrity.errors import UsageError


def _write_json(path: str | None, data: Any) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def _head_argument(text: str | None) -> Any:
    from torch_integrity.ledger import LedgerHead

    if text is None:
        return None
    if ":" in text and not Path(text).exists():
        count, _, value = text.partition(":")
        if not count.isdigit():
            raise UsageError(f"--head {text!r}: expected COUNT:HASH or a JSON file")
        return LedgerHead.from_json({"count": int(count), "hash": value})
    from torch_integrity.canonical import strict_loads

    try:
        return LedgerHead.from_json(strict_loads(Path(text).read_bytes(), what=text))
    except OSError as exc:
        raise UsageError(f"cannot read --head {text}: {exc.strerror}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from torch_integrity.audit import verify_run

    report = verify_run(args.run_dir, head=_head_argument(args.head))
    data = report.to_json()
    if args.trusted_key:
        from torch_integrity import signing

        seals = signing.check_seals(args.run_dir, args.trusted_key)
        data["seals"] = seals.to_json() if hasattr(seals, "to_json") else str(seals)
    print(f"run {report.run_id}: ledger verified ({report.records} records, {report.steps} steps, head {report.head.hash[:16]}...)")
    print(f"checkpoints verified at steps: {', '.join(map(str, report.checkpoints_verified))}")
    if args.trusted_key:
        print(f"seals: {data['seals']}")
    for extra in report.extra_files:
        print(f"extra file (not recorded): {extra}")
    for note in report.notes:
        print(f"note: {note}")
    print("VERIFIED")
    _write_json(args.json, data)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from torch_integrity.rundir import open_run
    from torch_integrity.segments import plan_segments

    history = open_run(args.run_dir)
    segments, notes = plan_segments(history)
    first = history.start[0]
    data: dict[str, Any] = {
        "run_id": history.run_id,
        "finished": history.finished,
        "records": history.head.count,
        "head": history.head.to_json(),
        "steps": history.step_count,
        "seed": first.get("seed"),
        "module": first.get("module"),
        "datamodule": first.get("datamodule"),
        "hyperparameters": first.get("hyperparameters"),
        "trainer": first.get("trainer"),
        "environment": first.get("environment"),
        "code_digest": (first.get("code") or {}).get("digest"),
        "resumes": [s["resume"] for s in history.start[1:] if s.get("resume")],
        "checkpoints": [
            {"step": c.step, "path": str(Path(args.run_dir) / c.path), "file": c.path, "model_digest": str(c.model.root),
             "epoch": c.body.get("epoch")}
            for c in history.checkpoints
        ],
        "segments": [{"index": s.index, "start_step": s.start_step, "end_step": s.end_step} for s in segments],
        "notes": notes,
    }
    if args.json:
        _write_json(args.json, data)
        if args.json == "-":
            return 0
    print(f"run {history.run_id} ({'finished' if history.finished else 'not finished'})")
    print(f"  module     {first.get('module')}   datamodule {first.get('datamodule')}")
    print(f"  seed       {first.get('seed')}   code {data['code_digest']}")
    env = first.get("environment") or {}
    print(f"  recorded on torch {env.get('torch')}, lightning {env.get('lightning')}, python {env.get('python')}, "
          f"CUDA {env.get('cuda')}, deterministic={first.get('trainer', {}).get('deterministic')}")
    print(f"  {history.step_count} step records, {history.head.count} records, head {history.head.hash}")
    for resume in data["resumes"]:
        print(f"  resumed from step {resume.get('step')} ({resume.get('file')})")
    print("  checkpoints:")
    for c in data["checkpoints"]:
        print(f"    step {c['step']:>8}  epoch {c['epoch']}  {c['file']}  {c['model_digest'][:40]}...")
    for note in notes:
        print(f"  note: {note}")
    return 0


def _progress(result: Any, done: int, total: int) -> None:
    if sys.stderr.isatty():
        bar = "#" * int(30 * done / total)
        print(f"\r[{bar:<30}] {done}/{total} segments", end="" if done < total else "\n", file=sys.stderr, flush=True)


def cmd_replay(args: argparse.Namespace) -> int:
    from torch_integrity.executors import parse_runtime_env
    from torch_integrity.replay import Verdict, replay

    report = replay(
        args.run_dir,
        segments=args.segment,
        from_step=args.from_step,
        to_step=args.to_step,
        sample=args.sample,
        seed=args.seed,
        workers=args.workers,
        factory=args.factory,
        tolerance=args.tolerance,
        allow_code_change=args.allow_code_change,
        progress=_progress,
        executor=args.executor,
        ray_address=args.ray_address,
        ray_runtime_env=parse_runtime_env(args.ray_runtime_env),
        ray_connect_timeout=args.ray_connect_timeout,
        ray_gpus_per_task=args.ray_gpus_per_task,
    )
    print(f"run {report.run_id}: replayed {len(report.segments)} of {report.total_segments} segments")
    print(f"{'segment':>7}  {'steps':>15}  {'verdict':<17} detail")
    for s in report.segments:
        print(f"{s.index:>7}  {f'{s.start_step}->{s.end_step}':>15}  {s.verdict.value:<17} {s.reason}")
    shown: set[str] = set()
    for s in report.segments:
        for difference in s.environment_differences:
            if difference not in shown:
                shown.add(difference)
                print(f"environment differs: {difference}")
    for note in report.notes:
        print(f"note: {note}")
    _write_json(args.json, report.to_json())
    if report.ok:
        within = any(s.verdict is Verdict.WITHIN_TOLERANCE for s in report.segments)
        print("REPRODUCED WITHIN TOLERANCE" if within else "REPRODUCED BIT FOR BIT")
        return 0
    print("DIVERGED")
    return 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from torch_integrity.audit import rollback

    path = rollback(args.run_dir, args.step, args.out)
    print(f"wrote verified weights of step {args.step} to {path}")
    return 0


def cmd_check_weights(args: argparse.Namespace) -> int:
    from torch_integrity.audit import check_weights

    match = check_weights(args.file, args.run_dir)
    data: dict[str, Any] = {"ok": True, "step": match.step, "checkpoint": match.checkpoint,
                            "model_digest": match.model_digest, "run_id": match.run_id}
    print(f"{args.file} equals the weights of run {match.run_id} at step {match.step} ({match.checkpoint})")
    if args.policy:
        from torch_integrity import signing
        from torch_integrity.digest import Digest

        approvals = signing.check_approvals(args.run_dir, Digest.parse(match.model_digest), args.policy)
        data["approvals"] = approvals.to_json() if hasattr(approvals, "to_json") else str(approvals)
        print(f"approved: {data['approvals']}")
    _write_json(args.json, data)
    return 0


def register(commands: Any) -> None:
    """Add verify, replay, log, rollback and check-weights to ``commands``."""
    p = commands.add_parser("verify", help="verify the ledger and every checkpoint (no training)",
                            description="Check the ledger's hash chain, every checkpoint file against its recorded "
                            "digests, and report missing, symlinked and extra files. Exit 0 verified, 1 integrity "
                            "failure, 2 unreadable input.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--head", help="a trusted ledger head taken earlier: COUNT:HASH or a JSON file {count, hash}")
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="public key whose seals are trusted (repeatable); checks the sealed heads")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (- for stdout)")
    p.set_defaults(handler=cmd_verify)

    p = commands.add_parser("replay", help="replay training segments and compare bit for bit",
                            description="Replay segments (checkpoint to checkpoint) through a real Lightning Trainer "
                            "with the recorded settings and batches; report per segment whether it reproduced bit for "
                            "bit, within a tolerance, or where it diverged. Exit 0 reproduced, 1 diverged or tampered, "
                            "2 usage error.")
    p.add_argument("run_dir")
    p.add_argument("--segment", type=int, action="append", metavar="N", help="replay segment N (repeatable)")
    p.add_argument("--from-step", type=int, metavar="A", help="replay segments overlapping steps A..B")
    p.add_argument("--to-step", type=int, metavar="B")
    p.add_argument("--sample", type=int, metavar="K", help="replay K segments chosen at random (needs --seed)")
    p.add_argument("--seed", type=int, metavar="S", help="the verifier's own seed for --sample")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel replay processes (default 1)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where segments run: local (this machine, --workers processes; default) or ray (one task per "
                   "segment on a running Ray cluster; pip install 'torch-integrity[ray]'; see docs/scaling.md)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster's head (GCS) address, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS)")
    p.add_argument("--ray-runtime-env", metavar="JSON",
                   help="Ray runtime_env for the tasks as a JSON object or a JSON file, e.g. '{\"working_dir\": \".\"}' "
                   "(a PYTHONPATH with this process's import path is added)")
    p.add_argument("--ray-connect-timeout", type=float, metavar="SECONDS",
                   help="give up joining the Ray cluster after this long (default 30)")
    p.add_argument("--ray-gpus-per-task", type=float, metavar="N",
                   help="GPUs each Ray task asks for (default: 1 per recorded process for runs recorded on CUDA, else 0)")
    p.add_argument("--factory", metavar="MODULE:FUNCTION",
                   help="function with no arguments returning (model, data) when the recorded import paths "
                   "and hyperparameters cannot rebuild them")
    p.add_argument("--tolerance", type=float, metavar="REL_L2",
                   help="accept end weights within this relative L2 distance (other hardware); never bit-exact")
    p.add_argument("--allow-code-change", action="store_true",
                   help="replay even if the model code changed since capture (reported in the verdict)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (- for stdout)")
    p.set_defaults(handler=cmd_replay)

    p = commands.add_parser("log", help="show the run's history", description="Show the run's settings, resumes and "
                            "checkpoints from its verified ledger.")
    p.add_argument("run_dir")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="print (or write to FILE) the history as JSON")
    p.set_defaults(handler=cmd_log)

    p = commands.add_parser("rollback", help="export verified model weights at a step",
                            description="Verify the checkpoint at --step and write its model weights to a "
                            "safetensors file (run id, step and digest in its metadata).")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.set_defaults(handler=cmd_rollback)

    p = commands.add_parser("check-weights", help="which checkpoint of a run does a weights file equal?",
                            description="Exit 0 naming the checkpoint whose model weights equal FILE's; exit 1 naming "
                            "the tensors that differ from the closest checkpoint.")
    p.add_argument("file", help="a safetensors weights file (e.g. from rollback or a model server)")
    p.add_argument("run_dir")
    p.add_argument("--policy", help="also require approvals per this policy file (k of n authorized keys)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON (- for stdout)")
    p.set_defaults(handler=cmd_check_weights)
