"""The bundle's model card (README.md): what the model is, how it was made, how well it does, its limits."""
from __future__ import annotations

from typing import Any, Optional

from distill.core.report import markdown_table, metrics_table, negative_lines, speed_table
from student.bundle import GRID, MINDIR, NEGATIVE_GRID, W_CONVENTION
from student.distill import describe_w

Row = dict[str, Any]


def target_text(training: dict[str, Any]) -> str:
    """The student's target when it is not plain CFG (``student.target=interval``: guided only inside its interval)."""
    if training.get("target", "cfg") != "interval":
        return ""
    lo, hi = training["interval"]
    if training.get("interval_input"):
        return (f" inside the guidance interval t in [{lo:g}, {hi:g}] and its conditional output outside it (its w "
                "input is 1 at steps outside the interval: `sample` and `sampler.mindir` do that by themselves; a "
                "sampling loop of your own around `model.mindir` passes w = 1 there, config.json "
                "`sampler.guidance_interval`)")
    return (f" inside the guidance interval t in [{lo:g}, {hi:g}] and its conditional output outside it (sample it "
            "at a constant w: the interval is in the weights)")


def _flatten(d: dict[str, Any], prefix: str = "") -> Row:
    out: Row = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = v
    return out


def _as_float(s: Any) -> Optional[float]:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def per_w_rows(report: Any, depth: int = 0) -> Optional[list[Row]]:
    """The first per-w table in an evaluation report, whatever its exact layout: a list of
    rows that carry a ``w`` key, or a mapping keyed by w values ("2.0": {...})."""
    if depth > 3:
        return None
    if isinstance(report, list) and report and all(isinstance(r, dict) and "w" in r for r in report):
        return [_flatten(r) for r in report]
    if isinstance(report, dict):
        if report and all(_as_float(k) is not None and isinstance(v, dict) for k, v in report.items()):
            return [{"w": _as_float(k), **_flatten(v)} for k, v in report.items()]
        for value in report.values():
            rows = per_w_rows(value, depth + 1)
            if rows:
                return rows
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def rows_table(rows: list[Row]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cols = ["w"] + [c for c in cols if c != "w"]
    return markdown_table(cols, ([_fmt(r.get(c)) for c in cols] for r in rows))


def project_tables(report: dict[str, Any]) -> Optional[str]:
    """The quality and speed tables exactly as ``task=evaluate`` renders them, if the report has that layout."""
    try:
        text = f"{metrics_table(report)}\n\n{speed_table(report)}"
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError):
        return None
    floor, speedup = report.get("real_vs_real_fd"), report.get("speedup")
    notes = [f"Real-vs-real FD floor: {floor:.3f}." if isinstance(floor, (int, float)) else "",
             f"Speed-up of the one-pass student over the two-pass teacher: **{speedup:.2f}x**."
             if isinstance(speedup, (int, float)) else ""]
    return "\n\n".join([text, " ".join(n for n in notes if n)]).strip()


def evaluation_section(report: Optional[dict[str, Any]]) -> str:
    if report is None:
        return "Not evaluated yet: run `task=evaluate` on the run, then publish again to include its metrics."
    tables = project_tables(report)
    if tables:
        n = report.get("num_samples", "the")
        return (f"From the run's last evaluation (`evaluate/report.json`): {n} class-balanced samples per model "
                f"and w, student and teacher on the same noise and classes. FD is the Frechet distance in the "
                f"evaluation classifier's features (lower is better).\n\n{tables}")
    rows = per_w_rows(report)
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    parts = ["From the run's last evaluation (`evaluate/report.json`): student and teacher on the same noise, "
             "classes and w grid."]
    if rows:
        parts.append(rows_table(rows))
    else:
        parts.append(f"The report has no per-w table; its keys are: {', '.join(map(str, report))}.")
    if scalars:
        parts.append("\n".join(f"- {k}: {_fmt(v)}" for k, v in scalars.items()))
    return "\n\n".join(parts)


def negative_section(config: dict[str, Any], report: Optional[dict[str, Any]]) -> str:
    """Negative classes in one pass: how to ask for them, the grid, and the evaluation's comparison."""
    if not config["guidance"].get("negative_classes"):
        return ""
    k, w = config["classes"]["num_classes"], config["sampler"]["w"]
    variants = config["guidance"].get("negative_variants") or []
    which = (f"The `{variants[0]}` variant takes them (`from_pretrained(path, variant=\"{variants[0]}\")`; "
             f"`task=sample` picks it when `sample.negative_class` is set): its stage-one weights are frozen and a "
             f"negative path trained beside them adds exact zeros with the null class, so it is the plain student "
             f"there.\n\n") if variants else ""
    table = "\n".join(negative_lines(report)[2:]) if report and report.get("negative") else (
        "Not evaluated yet: run `task=evaluate`, then publish again.")
    return f"""## Negative classes, in one pass

{which}Guide toward class y and away from class K with `model.sample(labels, w, negative=K)` (command line:
`sample.negative_class=K`): the student produces `out(K) + w * (out(y) - out(K))`, which a two-pass
teacher computes with K in place of the null class, in **one** network pass per step. K must differ
from every label; `negative=None` is the null class (plain guidance).

![negative classes]({NEGATIVE_GRID})

Rows: target class 0..{k - 1}; first column: the null class; column 1 + K: guided away from class K (blank where
K is the target), w = {w:g}, the same noise along each row.

{table}

"""


def _gate_text(model: dict[str, Any]) -> str:
    text = ""
    if model.get("guidance_class_gate"):
        r = model.get("guidance_class_ramp")
        ramp = f"min(w / {r:g}, 1) " if r else ""
        text += f",\n  class embedding gated by w: null + {ramp}(1 + gate(w)) * (class - null)"
    if model.get("guidance_film"):
        text += ",\n  each res block's features scaled by 1 + f(time + class + guidance embedding)"
    return text


def variants_section(config: dict[str, Any]) -> str:
    """The bundle's students (variants) as a table, and how to load one that is not the default."""
    variants = config.get("variants")
    if not variants:
        return "One student, used at the default sampler's steps."
    default = config.get("default_variant")
    rows = ["| variant | sampling steps | network passes per image | stage | weights |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        mark = " (default)" if name == default else ""
        rows.append(f"| `{name}`{mark} | {v['num_steps']} | {v['num_steps']} | {v.get('stage', '')} | `{v['weights']}` |")
    other = next((n for n in variants if n != default), None)
    pick = (f"\n\nAnother variant: `from_pretrained(path, variant=\"{other}\")` "
            f"(command line: `sample.variant={other}`).") if other else ""
    return "\n".join(rows) + pick


def progressive_text(training: dict[str, Any]) -> str:
    rounds = training.get("progressive") or []
    if not rounds:
        return ""
    steps = " -> ".join([str(rounds[0]["teacher_steps"])] + [str(r["steps"]) for r in rounds])
    return (f"\n- Few-step students: progressive distillation of that student, {steps} sampling steps, each round "
            "learning two of its teacher's deterministic DDIM steps in one (Salimans & Ho 2022; Meng et al. 2023, "
            "stage 2).")


def _sampler_mindir_text(ms_cfg: Optional[dict[str, Any]]) -> str:
    if not ms_cfg:
        return ""
    return (f"`{ms_cfg['file']}` is the whole default sampler ({ms_cfg['num_steps']} {ms_cfg['kind']} steps: noise, labels "
            f"and w in, images out), at the same fixed batch: a serving runtime needs no Python sampling loop.")


def model_card(config: dict[str, Any], report: Optional[dict[str, Any]], card_ws: list[float]) -> str:
    g, c, img, s = config["guidance"], config["classes"], config["image"], config["sampler"]
    m, mx = config["model"], config["mindir"]
    t = {k: ("unknown" if v is None else v) for k, v in config.get("training", {}).items()}
    names = ", ".join(map(str, c["names"]))
    shape = f"{img['channels']}x{img['height']}x{img['width']}"
    return f"""# One-pass guidance-distilled diffusion student ({t.get('data', 'unknown')})

A class-conditional diffusion model ({config['diffusion']['prediction']}-prediction, {config['diffusion']['schedule']}
logSNR schedule, continuous time t in [0, 1]) that produces the classifier-free-guided prediction
`{W_CONVENTION}` in **one** network pass per sampling step instead of two. The guidance weight w is an
input: w = 0 unconditional, w = 1 plain conditional, w > 1 stronger guidance. It was distilled for
w in [{g['w_min']:g}, {g['w_max']:g}].

- Images: {shape} (channels x height x width), values in [-1, 1]
- Classes ({c['num_classes']}): {names}; the null class index is {c['null_class']} (kept for the teacher's interface)
- Backbone: UNet, {m['channels']} channels x {m['channel_mult']}, {m['num_res_blocks']} res block(s) per level,
  attention {'on' if m['attention'] else 'off'}, guidance embedding of size {m['guidance_embed_dim']}{_gate_text(m)}

## Use

```python
from student import from_pretrained

model = from_pretrained("path/to/bundle")      # verifies manifest.json, then loads config.json + model.safetensors
images = model.sample(labels=[0, 1, 2], w={s['w']:g}, seed=0)  # N x C x H x W in [-1, 1]
```

Or from the command line: `distill task=sample sample.bundle=path/to/bundle sample.w=2`.
Default sampler: {s['kind']}, {s['num_steps']} steps, eta {s['eta']:g}, w = {s['w']:g} ({s['w_schedule']} schedule).

### Variants

{variants_section(config)}

`{MINDIR}` is the network alone (one pass: `(x, t, y, w) -> output`) exported for inference on Ascend with a
**fixed batch of {mx['batch_size']}** (MINDIR fixes the traced shapes; pad smaller batches). Run the sampling loop around it.
{_sampler_mindir_text(config.get('mindir_sampler'))}

## Training

- Teacher: classifier-free-guidance UNet, {t.get('teacher_steps', 'unknown')} steps, condition dropout
  p_uncond = {t.get('p_uncond', 'unknown')}.
- Student: the teacher's backbone plus a guidance-weight embedding added to the timestep embedding, initialised
  from the teacher, then {t.get('student_steps', 'unknown')} steps regressing onto the teacher's two-pass guided output{target_text(t)}
  with {describe_w(g['w_min'], g['w_max'], float(t.get('w_power', 1.0)))} per example (loss `{t.get('loss', 'unknown')}` x (1 + w)^-{t.get('w_loss_power', 0.0):g}, targets {t.get('targets', 'unknown')});
  these are the EMA weights (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion Models", stage 1).{progressive_text(config.get('training', {}))}

## Evaluation

{evaluation_section(report)}

## Samples

![samples]({GRID})

One row per w in {', '.join(f'{w:g}' for w in card_ws)}, one column per class, the same noise in every row
({s['num_steps']} {s['kind']} steps, seed 0).

{negative_section(config, report)}## Intended use and limits

- For research and teaching on guidance distillation: generating class-conditional images like the training
  data, and comparing one-pass against two-pass guided sampling.
- Outside [{g['w_min']:g}, {g['w_max']:g}] the model was never trained; `sample` refuses such w unless
  `allow_extrapolation=True`. Linear and cosine w schedules are checked over every step.
- Quality is bounded by the teacher and by the small training budget; check the evaluation table above rather
  than trusting single images. It only knows the classes listed; it is not a general image generator.
- `manifest.json` holds the SHA-256 and size of every file; `from_pretrained` refuses a bundle that does not match.
"""
