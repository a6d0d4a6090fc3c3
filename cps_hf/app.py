"""Try a trained model in the browser: a Gradio page (scripts/app.py) that runs locally and as a Hub Space.

Exported models carry custom code, so the Hub's own widget cannot serve them; this page can. It loads
any export (folder or Hub id, one network or an ensemble), segments an uploaded image with the
protocol the model was evaluated with (its `eval_protocol`, shown on the page), with toggles for the
flipped and the multi-scale prediction, and shows the colour mask, the overlay, and a legend of the
classes present with their share of the image. A file that is not an image, or one above the size
limit, gets a message on the page, never a stack trace. Gradio is an optional extra
(`pip install -e ".[app]"`); nothing here imports it until a page is built.

`export_space` writes a folder a Hub Space runs as is (app.py, this package's code, requirements,
README front matter naming the model); `push_space` uploads it and links it from the model card.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserInputError

# Small images (the demo's are under 100 px) drawn at the panel's size, pixels kept sharp; the files keep the
# image's own size. Gradio takes page CSS in launch().
PAGE_CSS = ("#cps-mask img, #cps-overlay img {width: 100%; height: 100%; object-fit: contain; "
            "image-rendering: pixelated;}")
MULTI_SCALES = (0.75, 1.0, 1.25)  # the toggle's scales, as scripts/evaluate_cps.py's README example
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPACE_LINK = re.compile(r"^Try it in the browser: .*$\n?", flags=re.M)


@dataclass
class Prediction:
    """One segmented image: class ids, the colour mask and overlay, each present class's share, the protocol."""

    mask: np.ndarray  # (H, W) class ids at the image's size
    colour_mask: np.ndarray  # (H, W, 3) uint8
    overlay: np.ndarray  # (H, W, 3) uint8
    shares: list[tuple[int, str, float, tuple[int, int, int]]]  # (id, name, share of pixels, colour), largest first
    protocol: str
    seconds: float


@dataclass
class Segmenter:
    """A loaded model and what the page needs to run it."""

    source: str
    model: object
    mean: tuple
    std: tuple
    device: object
    palette: list[int]
    protocol: dict
    protocol_source: str
    max_megapixels: float = 25.0
    id2label: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, source: str, device: str = "cpu", palette: str | Sequence[int] | None = "voc",
             max_megapixels: float = 25.0) -> "Segmenter":
        import torch

        from .inference import load_segmentation_model, model_eval_protocol, protocol_for_model
        from .visualize import get_palette

        if isinstance(palette, (str, os.PathLike)) and str(palette).endswith(".json"):
            palette = _palette_file(palette)
        model, mean, std = load_segmentation_model(source, torch.device(device))
        protocol, protocol_source = protocol_for_model("folder", source, model_eval_protocol(model.config),
                                                       default_name="the whole image at its own size")
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        return cls(source, model, mean, std, torch.device(device), get_palette(palette, len(id2label)), protocol,
                   protocol_source, max_megapixels, id2label)

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """An uploaded file as RGB uint8, or a one-line `UserInputError` saying why not (not an image, too large)."""
        from .data import DatasetError
        from .data.validation import _probe, decode_image

        name = Path(path).name
        try:
            (width, height), _ = _probe(str(path))  # header only: a huge image is refused before it is decoded
        except DatasetError as error:
            raise UserInputError(f"{name} is not an image this page can read ({error}); upload a JPEG, PNG, BMP or "
                                 "WebP file") from None
        megapixels = width * height / 1e6
        if megapixels > self.max_megapixels:
            raise UserInputError(f"{name} is {width} x {height} pixels ({megapixels:.1f} megapixels), above this page's "
                                 f"limit of {self.max_megapixels:g}; downscale it first (or start the app with a "
                                 "larger --max_megapixels)")
        try:
            return decode_image(str(path))
        except DatasetError as error:
            raise UserInputError(f"{name}: {str(error).split(': ', 1)[-1]}") from None

    def protocol_for(self, flip: bool, multi_scale: bool) -> dict:
        return {**self.protocol, "flip": bool(flip), "scales": list(MULTI_SCALES if multi_scale else (1.0,))}

    def predict(self, image: np.ndarray, flip: bool = False, multi_scale: bool = False,
                alpha: float = 0.5) -> Prediction:
        from .inference import describe_protocol_choice, predict_class_ids
        from .visualize import colorize, overlay

        protocol = self.protocol_for(flip, multi_scale)
        start = time.perf_counter()
        mask = predict_class_ids(self.model, [image], self.mean, self.std, protocol, self.device)[0]
        seconds = time.perf_counter() - start
        ids, counts = np.unique(mask, return_counts=True)
        shares = sorted(((int(i), self.id2label.get(int(i), str(i)), float(c) / mask.size, self.colour(int(i)))
                         for i, c in zip(ids, counts)), key=lambda entry: -entry[2])
        colours = np.where(mask <= 255, mask, 0)
        return Prediction(mask, np.asarray(colorize(colours, self.palette, rgb=True)),
                          np.asarray(overlay(image, colours, self.palette, alpha=alpha, ignore_index=None)), shares,
                          describe_protocol_choice(protocol, self.protocol_source), seconds)

    def colour(self, class_id: int) -> tuple[int, int, int]:
        index = 3 * (class_id % 256)
        return tuple(int(v) for v in self.palette[index: index + 3])


def _palette_file(path) -> list[int]:
    """The "palette" of a dataset's classes.json (the colours its labels are drawn in)."""
    try:
        palette = json.loads(Path(path).read_text()).get("palette")
    except (OSError, ValueError) as error:
        raise UserInputError(f"--palette {path}: cannot read it as a classes.json ({error})") from None
    if not isinstance(palette, list) or len(palette) % 3 or not all(isinstance(v, int) for v in palette):
        raise UserInputError(f"--palette {path}: has no flat [r, g, b, ...] 'palette' list")
    return palette


def model_name(source: str) -> str:
    """A readable name for a model: its Hub id, or its folder (the run's folder for an exported model/)."""
    path = Path(source)
    if not path.is_dir():
        return source
    path = path.resolve()
    return path.parent.name if path.name in ("model", "model_best", "model_ensemble") and path.parent.name else path.name


def legend_html(prediction: Prediction) -> str:
    """The classes present, largest share first: a colour swatch, the name and the share of the image."""
    rows = "".join(
        f'<li class="cps-legend-entry" data-class-id="{class_id}" data-share="{share:.6f}">'
        f'<span class="cps-swatch" style="display:inline-block;width:1em;height:1em;margin-right:.4em;'
        f'vertical-align:middle;border:1px solid #888;background:rgb{colour}"></span>'
        f'<span class="cps-class-name">{html.escape(name)}</span> <span class="cps-share">{100 * share:.1f}%</span></li>'
        for class_id, name, share, colour in prediction.shares)
    return f'<ul class="cps-legend" style="list-style:none;padding-left:0">{rows}</ul>'


def status_markdown(prediction: Prediction) -> str:
    height, width = prediction.mask.shape
    return (f"Segmented {width} x {height} pixels in {prediction.seconds:.2f} s. Protocol: {prediction.protocol}.")


def model_examples(source: str, extra: Sequence[str] = ()) -> list[str]:
    """Example images: those given, then the model folder's own `examples/` (when the model is a folder)."""
    found = [str(Path(p)) for p in extra]
    folder = Path(source) / "examples"
    if folder.is_dir():
        found += [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]
    return list(dict.fromkeys(found))


def build_page(segmenter: Segmenter, examples: Sequence[str] = (), title: str | None = None):
    """The Gradio Blocks page around `segmenter`."""
    import gradio as gr

    title = title or f"Semantic segmentation with {model_name(segmenter.source)}"
    names = ", ".join(segmenter.id2label[i] for i in sorted(segmenter.id2label))

    def segment(path, flip, multi_scale):
        if not path:
            return None, None, "", "Upload an image (or pick an example) to segment it."
        try:
            prediction = segmenter.predict(segmenter.read(path), flip, multi_scale)
        except UserInputError as error:
            return None, None, "", f"**Cannot segment this file:** {html.escape(str(error))}"
        return prediction.colour_mask, prediction.overlay, legend_html(prediction), status_markdown(prediction)

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {html.escape(title)}\n\nModel `{html.escape(segmenter.source)}` "
                    f"({len(segmenter.id2label)} classes: {html.escape(names)}). Default protocol: "
                    f"{html.escape(segmenter.protocol_source)}.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="cps-upload")
                flip = gr.Checkbox(label="Also average the flipped image", value=False, elem_id="cps-flip")
                multi = gr.Checkbox(label=f"Multi-scale ({', '.join(f'{s:g}' for s in MULTI_SCALES)})", value=False,
                                    elem_id="cps-multiscale")
                button = gr.Button("Segment", variant="primary", elem_id="cps-segment")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="Examples")
            with gr.Column(scale=2):
                with gr.Row():
                    mask = gr.Image(label="Mask", type="numpy", format="png", elem_id="cps-mask", interactive=False,
                                    height=360)  # small images are drawn large enough to see
                    blended = gr.Image(label="Overlay", type="numpy", format="png", elem_id="cps-overlay",
                                       interactive=False, height=360)
                legend = gr.HTML(elem_id="cps-legend")
                status = gr.Markdown(elem_id="cps-status")
        inputs, outputs = [upload, flip, multi], [mask, blended, legend, status]
        button.click(segment, inputs, outputs)
        upload.change(segment, inputs, outputs)
    return page


# ---------------------------------------------------------------------- a Hub Space

SPACE_APP = '''"""A Hub Space for a cps_hf model: the page of scripts/app.py (cps_hf.app), written by export_space."""
import json
from pathlib import Path

from cps_hf.app import PAGE_CSS, Segmenter, build_page, model_examples

SETTINGS = json.loads((Path(__file__).parent / "space_settings.json").read_text())
segmenter = Segmenter.load(SETTINGS["model"], palette=SETTINGS["palette"], max_megapixels=SETTINGS["max_megapixels"])
demo = build_page(segmenter, model_examples(SETTINGS["model"], SETTINGS["examples"]), title=SETTINGS["title"])

if __name__ == "__main__":
    demo.launch(css=PAGE_CSS)
'''


def _package_files() -> list[Path]:
    root = Path(__file__).resolve().parent
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


def _requirements() -> list[str]:
    """The package's own dependencies (pyproject.toml) plus gradio: what the Space installs."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    else:  # an installed copy: its metadata says the same
        from importlib.metadata import requires

        dependencies = [r for r in (requires("cps_hf") or []) if "extra ==" not in r]
    import gradio

    return [*dependencies, f"gradio>={gradio.__version__}"]


def export_space(model: str, folder: str | os.PathLike, title: str | None = None, palette: str | list = "voc",
                 max_megapixels: float = 25.0, examples: Sequence[str] = (), license: str = "mit") -> Path:
    """A Space folder that runs the page as is: app.py, the cps_hf package, requirements.txt, space_settings.json
    and README.md with the Space's front matter. A local model folder is copied in (`model/`); a Hub id is
    loaded by the Space from the Hub and named in the front matter."""
    import gradio

    from .inference import check_model_source

    check_model_source(model)
    target = Path(folder)
    if target.exists() and any(target.iterdir()):
        raise UserInputError(f"--export_space {folder}: folder exists and is not empty; give a new folder")
    target.mkdir(parents=True, exist_ok=True)
    local = Path(model).is_dir()
    package = Path(__file__).resolve().parent
    for path in _package_files():
        destination = target / "cps_hf" / path.relative_to(package)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    model_ref = "model" if local else model
    if local:
        shutil.copytree(model, target / "model", ignore=shutil.ignore_patterns("examples"))
    example_names = []
    for path in model_examples(model, examples):
        (target / "examples").mkdir(exist_ok=True)
        shutil.copy2(path, target / "examples" / Path(path).name)
        example_names.append(f"examples/{Path(path).name}")
    title = title or f"cps_hf: {model_name(model)}"
    if str(palette).endswith(".json"):  # a dataset's classes.json: its colours travel in the settings
        palette = _palette_file(palette)
    (target / "space_settings.json").write_text(json.dumps(
        {"model": model_ref, "palette": palette, "max_megapixels": max_megapixels, "examples": example_names,
         "title": title}, indent=1) + "\n")
    (target / "app.py").write_text(SPACE_APP)
    (target / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
    front = ["---", f"title: {json.dumps(title)}", "emoji: 🎨", "colorFrom: blue", "colorTo: green", "sdk: gradio",
             f"sdk_version: {gradio.__version__}", "app_file: app.py", f"license: {license}", "pinned: false"]
    if not local:
        front.append(f"models:\n- {model}")
    front.append("---")
    body = (f"\n# {title}\n\nSemantic segmentation with a cps_hf model "
            f"({'copied into this Space' if local else f'[{model}](https://huggingface.co/{model})'}): upload an "
            "image to see its mask, an overlay and the share of each class. Written by `scripts/app.py "
            "--export_space`.\n")
    (target / "README.md").write_text("\n".join(front) + "\n" + body)
    return target


def add_space_link(card: str, space_id: str) -> str:
    """The model card with one 'Try it in the browser' line for the Space after its first heading (replacing
    an older one), so a pushed Space is linked from the model's page."""
    line = f"Try it in the browser: [{space_id}](https://huggingface.co/spaces/{space_id})\n"
    card = SPACE_LINK.sub("", card)
    match = re.search(r"^# .*\n", card, flags=re.M)
    at = match.end() if match else (card.find("\n---", 3) + 5 if card.startswith("---") else 0)
    return card[:at] + "\n" + line + card[at:]


def push_space(folder: str | os.PathLike, space_id: str, model: str, token: str | None = None,
               private: bool | None = None) -> dict:
    """Upload a Space folder (one commit) and link the Space from the model card: the local folder's README.md
    when the model is a folder, the Hub model repo's README.md when it is a Hub id."""
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    api = HfApi(token=token)
    folder = Path(folder)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=str(path.relative_to(folder)), path_or_fileobj=str(path))
                  for path in sorted(folder.rglob("*")) if path.is_file() and "__pycache__" not in path.parts]
    space_commit = api.create_commit(repo_id=space_id, repo_type="space", operations=operations,
                                     commit_message="Space for a cps_hf model (scripts/app.py --export_space)")
    card_path = Path(model) / "README.md"
    if Path(model).is_dir():
        card_path.write_text(add_space_link(card_path.read_text() if card_path.is_file() else "", space_id))
        return {"space": space_commit, "card": str(card_path)}
    card = Path(hf_hub_download(model, "README.md", token=token)).read_text()
    card_commit = api.create_commit(
        repo_id=model, repo_type="model", commit_message=f"Link the Space {space_id}",
        operations=[CommitOperationAdd("README.md", io.BytesIO(add_space_link(card, space_id).encode()))])
    return {"space": space_commit, "card": card_commit}
