"""The `codi` command line."""
