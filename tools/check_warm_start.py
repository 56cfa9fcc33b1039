"""What recover's warm-start check (keep_better_start) would have decided for a study run made before it.

    python tools/check_warm_start.py study-cpu.yaml smollm2/noise-all/auto+eora smollm2-mha/noise-kv/auto+eora

For each finished run: the degraded model made again as the study makes it, the warm start made
again from the run's plan and data (its held-out KL must equal the recorded one), the trained
adapter loaded from the run folder, and both measured on the validation sequences the check uses
(``recover.VALIDATION_SEED``). Prints both and which one the check keeps.
"""

from __future__ import annotations

import argparse
import copy
import json

from recover_lora import study
from recover_lora.adapters import attach
from recover_lora.config import RecoverConfig, train_synth_config
from recover_lora.degrade import degrade
from recover_lora.kl import KLMeter
from recover_lora.load import load_model, load_tokenizer
from recover_lora.methods.recover_lora import placement_plan
from recover_lora.provenance import apply_adapter
from recover_lora.recover import VALIDATION_SEED, make_heldout
from recover_lora.synth import heldout, load_synthetic
from recover_lora.utils import read_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("config")
    p.add_argument("runs", nargs="+", help="model/damage/method")
    a = p.parse_args()
    scfg = study.StudyConfig.from_yaml(a.config)
    out = {}
    for name in a.runs:
        model, damage, method = name.split("/")
        rdir = study.config.run_dir(scfg, model, damage, method)
        cfg = RecoverConfig.from_dict(read_json(rdir / "config.json"))
        done = read_json(rdir / "done.json")
        ref = load_model(scfg.models[model], cfg.load).eval().requires_grad_(False)
        tok = load_tokenizer(scfg.models[model], cfg.load)
        deg = copy.deepcopy(ref)
        degrade(deg, study.degrade_config(scfg, damage, model))
        held = make_heldout(cfg, ref, tok, progress=False)
        plan = placement_plan(cfg, ref, deg, tok, held, write=False)
        train_ids = load_synthetic(cfg.data) if cfg.data else load_synthetic(rdir / "synth")
        start = attach(copy.deepcopy(deg), plan, seed=cfg.distill.seed, reference=ref, calib_ids=train_ids)
        trained = apply_adapter(copy.deepcopy(deg), rdir / "adapter")
        at_init = KLMeter(ref, held, cfg.distill.eval_batch_size, cfg.distill)(start)
        val = heldout(ref, tok, train_synth_config(cfg), max(8, cfg.heldout_sequences), progress=False,
                      offset=VALIDATION_SEED)
        meter = KLMeter(ref, val, cfg.distill.eval_batch_size, cfg.distill)
        r = {"recorded_init": done["heldout"]["init"]["kl"], "remade_init": at_init["kl"],
             "validation_start": meter(start)["kl"], "validation_trained": meter(trained)["kl"]}
        r["kept"] = "warm start" if r["validation_start"] <= r["validation_trained"] else "trained"
        out[name] = r
        print(name, json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
