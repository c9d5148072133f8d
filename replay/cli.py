"""`cwreplay`: replay recorded sessions against a live vLLM.

The replay harness is built by a later issue; until then the command says so
plainly instead of pretending to run.
"""

import typer

app = typer.Typer(add_completion=False, help="Replay traces against a live vLLM (not built yet).")


@app.callback(invoke_without_command=True)
def main() -> None:
    """Not built yet: the replay harness comes with the replay issue."""
    typer.echo("cwreplay is not built yet: use `cwsim run` to simulate a trace.", err=True)
    raise typer.Exit(code=2)
