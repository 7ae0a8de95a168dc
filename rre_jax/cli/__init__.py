"""rre_jax's console commands. Each module here is a thin command: parse arguments, load the config with the one
loader, call one library function, print a summary. Library modules never parse arguments or exit the process."""
