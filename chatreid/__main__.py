from chatreid.app.cli import app

app()
