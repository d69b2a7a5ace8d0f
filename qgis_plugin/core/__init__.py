"""Pure logic of the plugin: no widgets here, so it can be tested without a GUI."""
