"""`epic web`: a local web page (Gradio) to ask a compressed model about an image.

An image upload, a question, the method and budget, the answer streamed as it is generated, the kept-token overlay
and the cost summary; a side-by-side mode answers the same question at full tokens too. Every Ask is a fresh
one-question conversation (`epic chat` holds multi-turn ones). Uploads are checked here, not by Gradio: size first,
then whether Pillow can open them, and a failure is a message in the page. The page listens on 127.0.0.1 unless
another address is named explicitly. Gradio is imported only when the page is built (the `web` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

import epic
from epic.chat import FULL, ChatError, ChatSession, open_image
from epic.data.dataset import image_token_count
from epic.data.templates import Template
from epic.eval.show import KeptPatches, draw_kept

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD_MB = 20.0

Update = tuple[str, str, Image.Image | None, str]  # answer, full-token answer, overlay, cost


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
                    method = gr.Dropdown([*sorted(epic.METHODS), FULL], value="dart", label="Method", elem_id="method")
                    tokens = gr.Slider(
                        0,
                        demo.image_tokens,
                        value=min(64, demo.image_tokens),
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
        ask.click(demo.answer, inputs=inputs, outputs=outputs)
        question.submit(demo.answer, inputs=inputs, outputs=outputs)
    return app


def serve(demo: WebDemo, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until interrupted (one question at a time: the model is shared)."""
    if host not in LOOPBACK:
        print(f"epic web: listening on {host}: anyone who can reach this machine can use the model")
    app = build_app(demo)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, max_file_size=demo.max_upload_bytes, share=False, inbrowser=False
    )
