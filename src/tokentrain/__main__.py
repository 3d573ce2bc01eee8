from tokentrain.cli.main import entry

entry()
