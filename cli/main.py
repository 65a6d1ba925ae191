"""`codi`: distil Stable Diffusion into fast conditional generators (CoDi)."""

import os

# transformers announces at import that PyTorch is absent (the default install has none: the
# models are this project's); only its tokenizers and configs are used here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(
    name="codi",
    help="CoDi: distil Stable Diffusion into a fast conditional generator (1-4 steps).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings reflow as paragraphs (no hard line breaks)
)


def _version(value: bool) -> None:
    if value:
        from codi_eqx import __version__

        typer.echo(f"codi-eqx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """CoDi: distil Stable Diffusion into a fast conditional generator (1-4 steps)."""


from .convert import convert_weights  # noqa: E402
from .demo import demo  # noqa: E402
from .prepare_data import prepare_data  # noqa: E402
from .pretrain_toy import pretrain_toy  # noqa: E402
from .sample import sample  # noqa: E402
from .train import train  # noqa: E402

app.command("train")(train)
app.command("sample")(sample)
app.command("convert-weights")(convert_weights)
app.command("demo")(demo)
app.command("prepare-data")(prepare_data)
app.command("pretrain-toy")(pretrain_toy)

if __name__ == "__main__":
    app()
