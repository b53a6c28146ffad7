"""`lra-eval`: evaluate a checkpoint of a run on its validation and/or test split.

    lra-eval ckpt_path=runs/<run_id>/checkpoints/best-step=N.ckpt [split=test|val|both] [record=true] \
             [data_dir=DIR data.eval_batch_size=B trainer.accelerator=cpu ...]

The run's resolved config comes from the checkpoint itself (every checkpoint of lra-train carries it),
or else from the run folder's config.yaml; overrides apply on top. Overrides may change where data comes
from and how evaluation runs, never the model: a `model.*` or `attention.*` setting that differs from the
checkpoint's is refused, naming the keys. The checkpoint is loaded with weights only (no code runs).
`record=true` writes `eval-<checkpoint name>.json` into the run folder: a result record of the evaluation
(its `evaluation` field names the checkpoint and split), kept out of results_dir so that no table counts
a run twice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lra.training.checkpoints import CheckpointError, inside, load_failure
from lra.training.schema import ConfigError

OWN_KEYS = {"ckpt_path": None, "split": "test", "record": "false"}
SPLITS = {"val": ("val",), "test": ("test",), "both": ("val", "test")}
MODEL_SECTIONS = ("model", "attention")  # what the weights were trained as


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, overrides = dict(OWN_KEYS), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"'{arg}' is not key=value; usage: lra-eval ckpt_path=PATH [split=test|val|both] "
                              "[record=true] [config overrides]")
        if key in own:
            own[key] = value
        else:
            overrides.append(arg)
    if not own["ckpt_path"]:
        raise ConfigError("ckpt_path= is required: lra-eval ckpt_path=runs/<run_id>/checkpoints/best-step=N.ckpt")
    if own["split"] not in SPLITS:
        raise ConfigError(f"split={own['split']} is not a split; valid: {', '.join(SPLITS)}.")
    if own["record"] not in ("true", "false"):
        raise ConfigError(f"record={own['record']} must be true or false.")
    return own, overrides


def saved_config(ckpt: Path) -> tuple[DictConfig, dict]:
    """(the run's resolved config, the checkpoint) for checkpoint `ckpt`, loaded weights-only."""
    import torch

    try:
        loaded = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - damaged, foreign, or a pickle that wants to run code
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {load_failure(err)}. lra-eval reads checkpoints "
                              "written by lra-train.") from None
    text = loaded.get("lra_config") if isinstance(loaded, dict) else None
    beside = ckpt.parent.parent / "config.yaml"
    if text is None and beside.is_file():
        text = beside.read_text()
    if text is None or "state_dict" not in loaded:
        raise CheckpointError(f"{ckpt} holds no run config and there is no {beside}; lra-eval needs a checkpoint "
                              "written by lra-train (inside its run folder).")
    return OmegaConf.create(text), loaded


def model_differences(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """`key: checkpoint X, given Y` for every model/attention setting that differs."""
    def flat(c: DictConfig, prefix: str) -> dict:
        out = {}
        for k, v in (OmegaConf.to_container(c, resolve=True) or {}).items():
            if isinstance(v, dict):
                out.update(flat(OmegaConf.create(v), f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = {}, {}
    for section in MODEL_SECTIONS:
        a.update(flat(saved[section], f"{section}.") if section in saved else {})
        b.update(flat(cfg[section], f"{section}.") if section in cfg else {})
    return [f"{k}: checkpoint {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def evaluate(ckpt_path: str, split: str = "test", record: bool = False, overrides: list[str] | None = None) -> dict:
    """Rebuild the run of `ckpt_path`, evaluate its weights on `split`; returns {"val_acc"?, "test_acc"?, ...}."""
    from lra.training import records
    from lra.training.run import attention_stats, build, check_data, make_trainer

    path = inside(ckpt_path, Path(ckpt_path).resolve().parent)  # a local file; never a URL
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file.")
    saved, loaded = saved_config(path)
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides or [])))
    rid = cfg.get("run_id")
    cfg.run_id = None
    from lra.training.schema import validate

    validate(cfg)
    diff = model_differences(saved, cfg)
    if diff:
        raise ConfigError(f"the checkpoint {path} was trained with other model settings than given: "
                          f"{'; '.join(diff)}. Drop those overrides (lra-eval takes the model from the checkpoint).")
    cfg.run_id = rid
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    dm, module = build(cfg, check_data(cfg))
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in loaded["state_dict"].items()}
    if mine != theirs:
        bad = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise CheckpointError(f"{path} holds a different model than its config builds ({len(bad)} parameters "
                              f"differ, e.g. '{bad[0]}'); the model code changed since it was written.")
    cfg.progress = False
    trainer = make_trainer(cfg, path.parent, [], [], enable_progress_bar=False)
    out: dict = {"run_id": rid, "ckpt_path": str(path)}
    for s in SPLITS[split]:
        run_split = trainer.validate if s == "val" else trainer.test
        metrics = run_split(module, datamodule=dm, ckpt_path=str(path), verbose=False)
        out[f"{s}_acc"] = float(metrics[0][f"{s}/acc"]) * 100
    out["majority_acc"] = dm.majority_rate("test")
    out["attention_stats"] = attention_stats(module.net)
    if record and trainer.is_global_zero:
        from lra.atomic import write_json_atomic

        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        dest = folder / f"eval-{path.stem}.json"
        rec = records.make_record(cfg, "finished", **{k: out.get(k) for k in ("val_acc", "test_acc", "majority_acc")},
                                  attention_stats=out["attention_stats"], run_dir=str(folder))
        rec["evaluation"] = {"ckpt_path": str(path), "split": split, "command": "lra-eval " + " ".join(sys.argv[1:])}
        write_json_atomic(dest, rec)
        out["record"] = str(dest)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        own, overrides = parse_args(argv)
        out = evaluate(own["ckpt_path"], own["split"], own["record"] == "true", overrides)
    except Exception as err:  # noqa: BLE001 - one paragraph, as lra-train does; the traceback on request
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from lra.train import user_errors

        user = isinstance(err, (*user_errors(), CheckpointError))
        text = str(err) if user else f"{type(err).__name__}: {err} (set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"lra-eval: error: {text}", file=sys.stderr)
        sys.exit(2)
    accs = "  ".join(f"{s} acc {out[f'{s}_acc']:.2f}%" for s in ("val", "test") if f"{s}_acc" in out)
    print(f"[lra-eval] {out['run_id']}: {accs}  (majority class {out['majority_acc']:.2f}%)  checkpoint: "
          f"{out['ckpt_path']}" + (f"  record: {out['record']}" if "record" in out else ""))


if __name__ == "__main__":
    main()
