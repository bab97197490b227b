from lookalike.cli.main import app

app(prog_name="lookalike")
