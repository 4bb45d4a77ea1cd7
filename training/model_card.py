"""The README.md model card of an export folder (`mlcd export`), and its upload (`--push-to-hub`).

The card says what the weights are, from the files the export read: the architecture (the
checkpoint's ModelConfig), the training data, K (classes), l (labels per image), steps, samples
seen and loss (trainer_state.json's config), the eval table when one is found (``--eval FILE``, or
``<run.out_dir>/eval/results.md`` of the run that trained it), and the command that made it. The
license is left for the user to fill in (``license: other`` until they do): we cannot know the
terms of the data it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import ConfigError

CARD_NAME = "README.md"


def find_eval_table(state: dict, explicit: str | None) -> Path | None:
    """``--eval FILE`` if given, else the training run's ``eval/results.md`` when it exists."""
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"--eval {explicit!r}: no such file (an eval results.md)")
        return Path(explicit)
    out = ((state.get("config") or {}).get("run") or {}).get("out_dir")
    found = Path(out) / "eval" / "results.md" if out else None
    return found if found is not None and found.is_file() else None


def _arch_rows(mc: dict, params: int | None) -> list[str]:
    rows = [("preset", mc.get("name")), ("width / layers / heads", f"{mc.get('width')} / {mc.get('layers')} / "
            f"{mc.get('heads')}"), ("patch size / image size", f"{mc.get('patch_size')} / {mc.get('image_size')}"),
            ("position encoding", "2D RoPE (MLCD)" if mc.get("rope2d") else "learned (CLIP)"),
            ("head (embed_dim)", mc.get("embed_dim") or "none")]
    if params:
        rows.append(("backbone parameters", f"{params / 1e6:.2f} M"))
    return [f"| {k} | {v} |" for k, v in rows]


def _train_rows(state: dict) -> list[str]:
    train = (state.get("config") or {}).get("train") or {}
    loss, data = train.get("loss") or {}, train.get("data") or {}
    rows = [("data (shards)", data.get("shards")), ("cluster labels", data.get("labels")),
            ("K (classes)", state.get("num_classes")), ("l (labels per image)", loss.get("num_labels")),
            ("loss", f"{loss.get('mode')} (scale {loss.get('scale')}, margin {loss.get('margin')} "
                     f"{loss.get('margin_type')})" if loss else None),
            ("steps", state.get("step")), ("samples seen", state.get("samples_seen")),
            ("global batch", state.get("global_batch")), ("ranks", state.get("world_size"))]
    return [f"| {k} | {v} |" for k, v in rows if v is not None]


def model_card(info: dict, state: dict, eval_table: Path | None, command: str) -> str:
    """The README.md text: YAML front matter (hub metadata), then what the weights are."""
    mc = info.get("model_config") or {}
    name = mc.get("name", "model")
    lines = ["---", "license: other  # fill in: the terms of your training data and of this model",
             "library_name: transformers", "pipeline_tag: image-feature-extraction",
             "tags: [mlcd, vision, openmlcd]", "---", "",
             f"# OpenMLCD {name}", "",
             "A vision encoder pretrained with MLCD (multi-label cluster discrimination) by OpenMLCD: "
             "each image's positives are its l nearest of K cluster centers of its stage-1 embedding.",
             "", "## Architecture", "", "| | |", "|---|---|", *_arch_rows(mc, info.get("params")), "",
             "## Training", ""]
    train = _train_rows(state)
    lines += (["| | |", "|---|---|", *train] if train
              else [f"Exported from a bare state file ({info.get('source')}): no training record."])
    lines += ["", "## Evaluation", ""]
    lines += ([f"From `{eval_table}`:", "", eval_table.read_text().strip()] if eval_table
              else ["No eval results were found (run `mlcd eval`, then export with `--eval results.md`)."])
    lines += ["", "## Use", "", "```python", "from transformers import AutoModel, AutoImageProcessor",
              "model = AutoModel.from_pretrained(FOLDER)  # pooler_output: the image feature",
              "processor = AutoImageProcessor.from_pretrained(FOLDER)", "```", "",
              "## Provenance", "", "Made by:", "", "```", command, "```", "",
              f"Source: `{info.get('source')}`, step {info.get('step')}, weights dtype {info.get('dtype')}. "
              "`mlcd_export.json` holds the full record.", "", "## License", "",
              "Not set by the exporter: fill in the front matter's `license` before sharing.", ""]
    return "\n".join(lines)


def check_upload(repo: str, allow_upload: bool) -> None:
    """Before any work: an upload is refused unless the run allows it (one line, exit 2)."""
    if not allow_upload:
        raise ConfigError(f"--push-to-hub {repo!r} would upload the export to the Hugging Face hub; "
                          f"refused unless run.allow_upload=true")


def push_to_hub(folder: Path, repo: str, allow_upload: bool) -> str:
    """Uploads the export folder to the hub repo ``repo`` (created private if new)."""
    check_upload(repo, allow_upload)
    from huggingface_hub import create_repo, upload_folder
    create_repo(repo, exist_ok=True, private=True)
    return str(upload_folder(repo_id=repo, folder_path=str(folder),
                             commit_message=f"OpenMLCD export ({json.loads((folder / 'mlcd_export.json').read_text()).get('source')})"))
