"""The blind A/B rating widget for JupyterLab: ``tclab.rate(run_folder)``.

The same rating as the kernel-free page ``<run>/rating/rate.html`` (:mod:`tclab.rating`), with a
kernel: a rater name field, a pair counter, the two images of a pair side by side (labelled left and
right only), the buttons "left better", "same" and "right better", an optional score (how clear the
difference is, 1-5) and note, previous / next. Every judgement is appended to
``<run>/ratings/widget_<rater>_<hash>.jsonl`` the moment it is made (:func:`tclab.rating.append_judgement`),
so nothing is lost when the kernel dies, and a rater who comes back continues where they were (their
earlier judgements are shown and count until changed). The key is read only by "finish", which
writes the verdict (:func:`tclab.rating.write_verdict`: ratings_summary.json and the report) and
shows it.

ipywidgets is imported only when a widget is built.
"""

from __future__ import annotations

import functools
import html
import io
import os
from pathlib import Path


from . import rating

_DISPLAY_PX = 320  # the long side each image is shown at


def _shown_png(path: Path, target: int = _DISPLAY_PX) -> bytes:
    """The image at ``path`` as PNG bytes, upscaled by a whole factor (nearest neighbour) so small images
    show their pixels, or shrunk to ``target``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        k = target / max(w, h)
        im = (im.resize((w * int(k), h * int(k)), Image.NEAREST) if k >= 2 else
              im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BOX) if k < 1 else im)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


@functools.cache
def _widget_class():
    """Build the widget class on first use, so ipywidgets is imported only when a widget is made."""
    import ipywidgets as w

    class RatingWidget(w.VBox):
        """The rating widget (see :func:`rate`).

        Controls: ``rater`` (Text), ``left_button`` / ``same_button`` / ``right_button`` (Button; CSS
        classes ``tclab-rate-left``, ``tclab-rate-same``, ``tclab-rate-right``), ``score``
        (ToggleButtons "-", "1".."5"), ``note`` (Textarea, saved when it loses focus), ``prev_button``,
        ``next_button``, ``finish_button``. Views: ``left_image``, ``right_image`` (Image),
        ``counter`` and ``status`` (HTML). ``index`` is the pair shown, ``saved`` the judgements of the
        current rater that count (``{pair: Judgement}``), ``path`` the file they are appended to.
        """

        def __init__(self, run_dir: Path, rater: str | None):
            self.run_dir = Path(run_dir)
            self.set = rating.read_rating_set(self.run_dir)
            self.index, self.saved, self._loading = 0, {}, False
            self.rater = w.Text(value=rater or "", description="your name", placeholder="rater name",
                                continuous_update=False, layout=w.Layout(width="320px"))
            self.rater.add_class("tclab-rate-rater")
            self.counter = w.HTML()
            self.counter.add_class("tclab-rate-counter")
            fixed = w.Layout(flex="none", object_fit="contain", border="1px solid #d9dee5")
            self.left_image = w.Image(format="png", layout=fixed)
            self.right_image = w.Image(format="png", layout=fixed)
            self.left_button = w.Button(description="left better", layout=w.Layout(width="130px"))
            self.same_button = w.Button(description="same", layout=w.Layout(width="130px"))
            self.right_button = w.Button(description="right better", layout=w.Layout(width="130px"))
            for b, choice in ((self.left_button, "left"), (self.same_button, "same"), (self.right_button, "right")):
                b.add_class(f"tclab-rate-{choice}")
                b.on_click(functools.partial(self._chose, choice))
            self.score = w.ToggleButtons(options=["-", "1", "2", "3", "4", "5"], value="-",
                                         tooltips=["no score", "barely visible", "", "", "", "obvious"],
                                         style={"button_width": "34px"})
            self.score.add_class("tclab-rate-score")
            self.note = w.Textarea(placeholder="note (optional): what differs, what looks wrong",
                                   continuous_update=False, layout=w.Layout(width="660px", height="48px"))
            self.note.add_class("tclab-rate-note")
            self.prev_button = w.Button(description="previous", icon="arrow-left")
            self.next_button = w.Button(description="next", icon="arrow-right")
            self.finish_button = w.Button(description="finish: show the verdict", layout=w.Layout(width="220px"))
            for b, name in ((self.prev_button, "prev"), (self.next_button, "next"), (self.finish_button, "finish")):
                b.add_class(f"tclab-rate-{name}")
            self.prev_button.on_click(lambda _: self.go(self.index - 1))
            self.next_button.on_click(lambda _: self.go(self.index + 1))
            self.finish_button.on_click(lambda _: self.finish())
            self.status = w.HTML()
            self.status.add_class("tclab-rate-status")
            intro = w.HTML(f"<b>Blind A/B rating</b> of run {html.escape(self.set.run)}: each pair is one input "
                           "image made twice with the same seed by two settings, placed left and right at random; "
                           "nothing here says which is which. Which looks better? Every answer is saved at once.")
            captions = w.HBox([w.HTML("<b>left</b>", layout=w.Layout(width=f"{_DISPLAY_PX + 24}px")),
                               w.HTML("<b>right</b>")])
            super().__init__(children=[
                intro, w.HBox([self.rater, self.counter], layout=w.Layout(align_items="center")),
                w.HBox([self.left_image, self.right_image], layout=w.Layout(grid_gap="24px")), captions,
                w.HBox([self.left_button, self.same_button, self.right_button]),
                w.HBox([w.HTML("how clear is the difference? (optional)&nbsp;"), self.score,
                        w.HTML("&nbsp;1 = barely visible, 5 = obvious")], layout=w.Layout(align_items="center")),
                self.note,
                w.HBox([self.prev_button, self.next_button, self.finish_button]), self.status])
            self.add_class("tclab-rating-widget")
            self.rater.observe(lambda _: self._load_rater(), names="value")
            self.score.observe(lambda _: self._detail_changed(), names="value")
            self.note.observe(lambda _: self._detail_changed(), names="value")
            self._load_rater()

        # ---- state --------------------------------------------------------------------------------

        @property
        def name(self) -> str:
            return " ".join(self.rater.value.split())

        @property
        def path(self) -> Path | None:
            return rating.widget_ratings_path(self.run_dir, self.name) if self.name else None

        @property
        def pair(self) -> rating.RatingPair:
            return self.set.pairs[self.index]

        def _load_rater(self) -> None:
            """The current rater's judgements that count (any source), and the first pair they have not rated."""
            self.saved = {}
            if self.name:
                mine = [j for j in rating.latest_judgements(rating.read_judgements(self.run_dir))
                        if j.rater.casefold() == self.name.casefold()]
                self.saved = {j.pair: j for j in mine}
                todo = [i for i, p in enumerate(self.set.pairs) if p.pair not in self.saved]
                self.index = todo[0] if todo else 0
            self.update()

        def _record(self, choice: str) -> None:
            score = None if self.score.value == "-" else int(self.score.value)
            j = rating.Judgement(pair=self.pair.pair, choice=choice, rater=self.name, time_utc=rating.utc_now(),
                                 score=score, note=self.note.value, source="widget")
            rating.append_judgement(self.run_dir, j, self.path)
            self.saved[j.pair] = j

        def _chose(self, choice: str, _button=None) -> None:
            if not self.name:
                self.status.value = "<b>Enter your name first</b> (it goes with every judgement)."
                return
            self._record(choice)
            self.update()

        def _detail_changed(self) -> None:
            """A score or note changed after the choice: save the judgement again (the latest counts)."""
            if self._loading or not self.name or self.pair.pair not in self.saved:
                return
            old = self.saved[self.pair.pair]
            score = None if self.score.value == "-" else int(self.score.value)
            if (old.score, old.note) != (score, self.note.value):
                self._record(old.choice)
                self.update()

        def go(self, index: int) -> None:
            self.index = max(0, min(len(self.set.pairs) - 1, int(index)))
            self.update()

        # ---- view ---------------------------------------------------------------------------------

        def update(self) -> None:
            """Show the current pair and the current rater's judgement of it."""
            p, n = self.pair, len(self.set.pairs)
            folder = self.run_dir / rating.RATING_DIR / rating.IMAGES_DIR
            self.left_image.value = _shown_png(folder / p.left)
            self.right_image.value = _shown_png(folder / p.right)
            done = len(self.saved)
            self.counter.value = (f"<b>pair {self.index + 1} of {n}</b> ({html.escape(p.pair)}"
                                  f"{', ' + html.escape(p.cls) if p.cls else ''}) &middot; rated {done} of {n}")
            j = self.saved.get(p.pair)
            for b, choice in ((self.left_button, "left"), (self.same_button, "same"), (self.right_button, "right")):
                b.button_style = "primary" if j is not None and j.choice == choice else ""
                b.disabled = not self.name
            self._loading = True
            try:
                self.score.value = "-" if j is None or j.score is None else str(j.score)
                self.note.value = "" if j is None else j.note
            finally:
                self._loading = False
            self.prev_button.disabled = self.index == 0
            self.next_button.disabled = self.index == n - 1
            self.finish_button.disabled = not done
            if not self.name:
                self.status.value = "Enter your name to start."
            elif done == n:
                self.status.value = f"All {n} pairs rated (saved to ratings/{self.path.name}): press <i>finish</i>."
            else:
                self.status.value = f"Saved to ratings/{self.path.name} as you go." if done else ""

        def finish(self) -> rating.HumanVerdict:
            """Write the verdict of every rater so far (ratings_summary.json, the report) and show it."""
            v = rating.write_verdict(self.run_dir)
            self.status.value = (f"<b>Verdict ({v.verdict})</b>: {html.escape(v.sentence)} Written to "
                                 f"{rating.SUMMARY_NAME} and the run's report.html.")
            return v

        def __repr__(self) -> str:  # the text/plain of a display: one line, not the trait dump
            return (f"Blind A/B rating widget for run {self.set.run} ({len(self.set.pairs)} pairs): it needs a running "
                    f"Jupyter kernel; without one, open {rating.RATING_DIR}/{rating.PAGE_NAME} in the run folder.")

    RatingWidget.__qualname__ = "RatingWidget"
    return RatingWidget


def rate(run_folder: str | os.PathLike, rater: str | None = None):
    """The blind A/B rating widget of a run's rating set (``<run>/rating/``, written by notebook 05).

    Args:
        run_folder: the run folder (a path; relative paths as the user typed them, ``tclab.paths``).
        rater: the rater's name, or None to type it in the widget.

    Returns a :class:`RatingWidget` (an ipywidgets VBox; see its attributes).
    """
    from .paths import resolve_path

    return _widget_class()(resolve_path(run_folder, "run_folder"), rater)


def __getattr__(name: str):
    if name == "RatingWidget":  # built on first use (imports ipywidgets)
        return _widget_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

