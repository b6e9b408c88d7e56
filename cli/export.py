"""`cmacc export`: a registered checkpoint's query encoders as safetensors files with torchvision's
tensor names, a JSON per encoder (how to rebuild and feed it) and a model card (workers/export.py).

Storage only, no Ray. The handler imports `workers.export` (torch) inside itself.
"""

from __future__ import annotations

import argparse
import json

from service.config import Config
from service.errors import UsageError

DEFAULT_ROOT = Config().storage.root
MODALITIES = ("video", "audio")


def parse_modalities(text: str | None) -> tuple[str, ...]:
    """`video,audio` -> ("video", "audio"), in that order; None -> both."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if text is not None and not names:
        raise UsageError("--modality: name video, audio or both (video,audio)")
    unknown = [name for name in names if name not in MODALITIES]
    if unknown:
        raise UsageError(f"--modality: unknown modality {unknown[0]!r} (choose from {', '.join(MODALITIES)})")
    return tuple(m for m in MODALITIES if m in names) if names else MODALITIES


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def _export(args: argparse.Namespace) -> int:
    modalities = parse_modalities(args.modality)
    if (args.checkpoint is None) == (args.run_id is None):
        raise UsageError("cmacc export: give exactly one of --checkpoint URI and --run ID")
    if not args.out.strip():
        raise UsageError("cmacc export: --out must name a folder or URI")
    from workers import export  # torch loads only now

    result = export.export(
        checkpoint=args.checkpoint,
        run_id=args.run_id,
        storage_root=args.storage,
        out=args.out,
        modalities=modalities,
        with_heads=args.with_heads,
    )
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
        return 0
    run = f"run {result['run_id']} " if result["run_id"] else ""
    print(f"exported {run}step {result['step']} ({result['checkpoint']}) to {result['out']}:")
    width = max(len(f["uri"]) for f in result["files"])
    for entry in result["files"]:
        print(f"  {entry['uri']:<{width}}  {_size(entry['bytes']):>10}")
    fits = [m for m, ok in result["torchvision_compatible"].items() if ok]
    if fits:
        print(f"torchvision's models load {' and '.join(fits)} as the model card ({result['out']}/README.md) shows")
    print("load with:\n  " + "\n  ".join(result["load"]), flush=True)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export a checkpoint's encoders as safetensors files torchvision's models load, with a model card",
        description="Write the query encoders of a registered checkpoint (or of a run's newest) as "
        "<modality>.safetensors (torchvision's tensor names), <modality>.json (architecture, inputs, "
        "normalisation) and a README.md model card to a folder or URI. Nothing is written unless every "
        "check passes.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", dest="run_id", default=None, help="run id: its newest registered checkpoint")
    which.add_argument("--checkpoint", default=None, help="checkpoint folder URI")
    parser.add_argument("--storage", default=DEFAULT_ROOT, help=f"storage root of --run (default: {DEFAULT_ROOT})")
    parser.add_argument("--out", required=True, help="destination folder or URI (s3://...)")
    parser.add_argument(
        "--modality", default=None, help="encoders to export, comma-separated: video, audio (default: video,audio)"
    )
    parser.add_argument(
        "--with-heads", action="store_true", help="also export the projection heads (tensors under 'head.')"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_export)
