"""The one typed config schema and the loader that merges YAML files and --set overrides into it."""
