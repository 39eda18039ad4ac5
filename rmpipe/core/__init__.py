"""The ground floor every part stands on: the data contract (schema), params and settings, project paths, atomic I/O, errors, progress, the stage wrapper and the code-deps generator."""
