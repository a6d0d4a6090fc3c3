#!/usr/bin/env python
"""Try a trained model in the browser: a Gradio page, locally or as a Hub Space (cps_hf/app.py).

    pip install -e ".[app]"                                   # gradio, an optional extra
    python scripts/app.py --model outputs/demo/model          # then open http://127.0.0.1:7860
    python scripts/app.py --model you/cps-voc --examples photo1.jpg photo2.jpg --port 8080
    python scripts/app.py --model outputs/demo/model --export_space my_space            # a Space-ready folder
    python scripts/app.py --model you/cps-voc --export_space my_space --push_space you/cps-voc-demo

The page segments an uploaded image with the protocol the model was evaluated with (shown on the page;
toggles add the flipped and the multi-scale prediction) and shows the colour mask and the overlay side by
side, with a legend of the classes present and their share of the image. Examples come from --examples and
from the model folder's own examples/. A file that is not an image, or one above --max_megapixels, gets a
message on the page. --export_space writes a folder a Hub Space runs as is (the model copied in when it is a
folder); --push_space uploads it and adds a link to the Space to the model card. A mistake in the arguments
is one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402
from cps_hf.errors import UserInputError  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id (one network or an ensemble)")
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port the page listens on (0: a free one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    parser.add_argument("--palette", default="voc",
                        help="mask and legend colours: voc, cityscapes, or a dataset's classes.json with a palette "
                             "(e.g. demo_data/VOCdevkit/VOC2012/classes.json)")
    parser.add_argument("--max_megapixels", type=float, default=25.0,
                        help="larger uploads are refused with a message (read from the header, never decoded)")
    parser.add_argument("--examples", nargs="+", default=[], help="example images shown under the upload")
    parser.add_argument("--title", help="page title; default: from the model's name")
    parser.add_argument("--export_space", metavar="DIR", help="write a Hub Space folder for the model and exit")
    parser.add_argument("--push_space", metavar="SPACE_ID",
                        help="with --export_space: upload it to this Space and link the Space from the model card "
                             "(token from HF_TOKEN or `hf auth login`)")
    args = parser.parse_args(argv)
    if args.push_space and not args.export_space:
        parser.error("--push_space needs --export_space DIR (the folder that is uploaded)")
    if args.palette not in ("voc", "cityscapes") and not (args.palette.endswith(".json") and Path(args.palette).is_file()):
        parser.error(f"--palette {args.palette}: give voc, cityscapes or an existing classes.json")
    if args.max_megapixels <= 0:
        parser.error(f"--max_megapixels must be > 0, got {args.max_megapixels}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    missing = [path for path in args.examples if not Path(path).is_file()]
    if missing:
        raise UserInputError(f"--examples: no such file {missing[0]}")
    return args


def _gradio():
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError('the app needs gradio: pip install -e ".[app]" (or pip install gradio)') from None


def main(argv=None):
    args = parse_args(argv)
    _gradio()
    from cps_hf.app import PAGE_CSS, Segmenter, build_page, export_space, model_examples, push_space
    from cps_hf.inference import check_model_source

    check_model_source(args.model)
    if args.export_space:
        folder = export_space(args.model, args.export_space, title=args.title, palette=args.palette,
                              max_megapixels=args.max_megapixels, examples=args.examples)
        print(f"wrote a Space folder to {folder}")
        if args.push_space:
            pushed = push_space(folder, args.push_space, args.model)
            print(f"pushed it to https://huggingface.co/spaces/{args.push_space}; the model card links it ({pushed['card']})")
        return 0
    segmenter = Segmenter.load(args.model, device=args.device, palette=args.palette,
                               max_megapixels=args.max_megapixels)
    page = build_page(segmenter, model_examples(args.model, args.examples), title=args.title)
    page.queue().launch(server_name=args.host, server_port=args.port or None, show_error=False, css=PAGE_CSS)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
