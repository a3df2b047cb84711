"""``abmll export``: an abmll adapter as a PEFT LoRA folder."""

from __future__ import annotations

from pathlib import Path

from abmll.args import ExportArgs, RunArgs
from abmll.config import RunConfig
from abmll.export import export_peft, load_adapter_folder
from abmll.loading import load_prior
from abmll.outputs import guard_adapter_folder


def run_export(run: RunArgs, args: ExportArgs, cfg: RunConfig) -> Path:
    """Write the abmll adapter ``args.adapter`` as a PEFT LoRA folder (+ scale sidecar) in ``run.out``."""
    if not args.adapter:
        raise SystemExit("export: --adapter DIR is required")
    guard_adapter_folder(run.out, args.adapter, run.overwrite)
    _, saved = load_adapter_folder(args.adapter)
    model, _, tensors, _ = load_prior(args.adapter, cfg)
    config = {**saved, **cfg.only("model", "lora").to_dict(), "exported_from": str(args.adapter)}
    config.pop("format", None)
    export_peft(run.out, tensors, config, model=model, base_model_name_or_path=args.base_model_name_or_path)
    print(f"PEFT LoRA adapter (posterior mean) + abmll_scale.safetensors written to {run.out}")
    return Path(run.out)
