from chatreid.cli import app

app()
