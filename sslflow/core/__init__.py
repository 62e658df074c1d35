"""Settings, errors, the project directory and environment defaults: the bottom layer every other package imports."""
