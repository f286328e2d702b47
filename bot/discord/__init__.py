"""The Discord surface (discord.py): see app.py."""
