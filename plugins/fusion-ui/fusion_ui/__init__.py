"""fusion-ui: ``fuse ui``, a local web page to compose runs and browse the results database."""
