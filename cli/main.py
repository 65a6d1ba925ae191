"""`codi`: distil Stable Diffusion into fast conditional generators (CoDi)."""

import typer

app = typer.Typer(
    name="codi",
    help="CoDi: distil Stable Diffusion into a fast conditional generator (1-4 steps).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
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
