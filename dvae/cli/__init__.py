"""The console commands: argument parsing and the error exit around the library."""
