"""`epic web`: a local web page (Gradio) to ask a compressed model about an image.

An image upload, a question, the method and budget, the answer streamed as it is generated, the kept-token overlay
and the cost summary; a side-by-side mode answers the same question at full tokens too. Every Ask is a fresh
one-question `epic.chat.ChatSession` (`epic chat` holds multi-turn ones). Uploads are checked here, not by Gradio:
size first, then the pixel count and the format (`epic.chat.open_image`), and a failure is a message in the page.
The page listens on loopback; another address needs `allow_remote` (`--allow-remote`) as well. Gradio is imported
only when the page is built (the `web` extra).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from epic.chat import FULL, ChatError, ChatSession, open_image
from epic.compression import default_tokens
from epic.compression.registry import method_names
from epic.data.dataset import image_token_count
from epic.data.templates import Template
from epic.eval.show import KeptPatches, draw_kept

DEFAULT_MAX_UPLOAD_MB = 20.0
MODEL_QUEUE = "model"  # the concurrency group of every event that runs the model: one at a time, whichever it is

Update = tuple[str, str, Image.Image | None, str]  # answer, full-token answer, overlay, cost


def is_loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuse a `host` other than loopback unless `allow_remote` says so explicitly."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(
            f"epic web listens on loopback only; to listen on {host} (reachable from other machines) add --allow-remote"
        )


def _gradio():
    """Gradio, imported on demand with a clear message when the `web` extra is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise SystemExit("epic web needs Gradio: pip install 'epic-mllm[web]'") from None
    return gradio


class WebDemo:
    """What the page does, without Gradio: check uploads and answer questions (streamed updates)."""

    def __init__(
        self,
        model,
        processor,
        template: Template,
        layer: int = 2,
        max_new_tokens: int = 64,
        max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
    ) -> None:
        self.model = model
        self.processor = processor
        self.template = template
        self.layer = layer
        self.max_new_tokens = max_new_tokens
        self.max_upload_bytes = max_upload_bytes
        self.image_tokens = image_token_count(processor)

    def check_upload(self, path: str | None) -> tuple[Image.Image | None, str]:
        """The uploaded image for a preview and a status line; a message naming the problem instead."""
        if not path:
            return None, "no image yet: upload one"
        try:
            image = open_image(path, self.max_upload_bytes)
        except ChatError as error:
            return None, f"error: {error}"
        return image, f"{Path(path).name}: {image.width}x{image.height}, {self.image_tokens} visual tokens"

    def _session(self, image: Image.Image, method: str, tokens: int) -> ChatSession:
        return ChatSession(
            self.model,
            self.processor,
            self.template,
            image,
            method,
            tokens,
            self.layer,
            self.max_new_tokens,
        )

    def warm_up(self) -> None:
        """Answer one short question on a blank image, compressed and not, so that the first answer a user times
        is not also the one that pays for the first forward's one-time costs."""
        image = Image.new("RGB", (64, 64))
        for method, tokens in (("dart", default_tokens(self.image_tokens)), (FULL, self.image_tokens)):
            session = ChatSession(self.model, self.processor, self.template, image, method, tokens, self.layer, 2)
            with session:
                session.ask("What is in the image?")

    def _overlay(self, session: ChatSession) -> Image.Image | None:
        side = math.isqrt(self.image_tokens)
        if side * side != self.image_tokens:
            return None  # not a square patch grid: nothing to draw on
        label = session.method if session.compressed else "all tokens"
        return draw_kept(session.image, [KeptPatches(label, session.tokens, session.kept_patches, side)])

    def answer(
        self, path: str | None, question: str, method: str, tokens: float, side_by_side: bool
    ) -> Iterator[Update]:
        """Updates of (answer, full-token answer, overlay, cost) while answering; an error is a message in the
        answer box."""
        try:
            if not path:
                raise ChatError("no image: upload one first")
            image = open_image(path, self.max_upload_bytes)
            sessions = [self._session(image, method, round(tokens))]
            if side_by_side:
                sessions.append(self._session(image, FULL, self.image_tokens))
            if not question.strip():
                raise ChatError("empty question: type one first")
        except ChatError as error:
            yield f"error: {error}", "", None, ""
            return
        texts, costs, overlay = ["", ""], [], None
        for index, session in enumerate(sessions):
            with session:
                for piece in session.stream(question):
                    texts[index] += piece
                    yield texts[0], texts[1], overlay, "\n".join(costs)
                if index == 0:
                    overlay = self._overlay(session)
                name = session.settings() if index == 0 else "full tokens"
                costs.append(f"{name}: {session.last.cost.line()}")
        yield texts[0], texts[1], overlay, "\n".join(costs)


def build_app(demo: WebDemo):
    """The Gradio Blocks page over `demo`; every component has an `elem_id` (image, question, ask, answer, ...)."""
    gr = _gradio()
    limit = demo.max_upload_bytes / 2**20
    with gr.Blocks(title="epic: talk to a compressed LLaVA") as app:
        gr.Markdown("## epic: ask a compressed LLaVA about an image")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label=f"Image (up to {limit:g} MiB)", type="filepath", elem_id="image")
                preview = gr.Image(label="Uploaded", interactive=False, elem_id="preview", height=240)
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            with gr.Column():
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                with gr.Row():
                    method = gr.Dropdown([*method_names(), FULL], value="dart", label="Method", elem_id="method")
                    tokens = gr.Slider(
                        1,
                        demo.image_tokens,
                        value=default_tokens(demo.image_tokens),
                        step=1,
                        label=f"Visual tokens kept (of {demo.image_tokens})",
                        elem_id="tokens",
                    )
                side_by_side = gr.Checkbox(label="Also answer at full tokens (side by side)", elem_id="side_by_side")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Row():
            answer = gr.Textbox(label="Answer (chosen budget)", interactive=False, elem_id="answer")
            answer_full = gr.Textbox(label="Answer (full tokens)", interactive=False, elem_id="answer_full")
        with gr.Row():
            overlay = gr.Image(label="Kept visual tokens", interactive=False, elem_id="overlay")
            cost = gr.Textbox(label="Cost", interactive=False, lines=2, elem_id="cost")
        upload.change(demo.check_upload, inputs=upload, outputs=[preview, status])
        inputs = [upload, question, method, tokens, side_by_side]
        outputs = [answer, answer_full, overlay, cost]
        # one queue for both ways to ask: two bound methods would be two groups (Gradio keys them by id), so a click
        # and an Enter could run the shared model at once
        ask.click(demo.answer, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id=MODEL_QUEUE)
        question.submit(demo.answer, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id=MODEL_QUEUE)
    return app


def serve(demo: WebDemo, host: str = "127.0.0.1", port: int = 7860, allow_remote: bool = False) -> None:
    """Serve the page until interrupted (one question at a time: the model is shared). A `host` other than loopback
    is refused unless `allow_remote` says so explicitly."""
    check_host(host, allow_remote)
    if not is_loopback(host):
        print(f"epic web: listening on {host}: anyone who can reach this machine can use the model")
    app = build_app(demo)
    print(f"epic web: serving on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    app.queue(default_concurrency_limit=1).launch(
        quiet=True,  # Gradio's banner would suggest share=True, a public tunnel
        server_name=host,
        server_port=port,
        max_file_size=demo.max_upload_bytes,
        share=False,
        inbrowser=False,
        ssr_mode=False,  # no Node front server, whose address Gradio may take from the environment
    )
