"""JupyterLab extension: server handlers and front end (issue: JupyterLab extension)."""
