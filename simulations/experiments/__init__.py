"""Experiments: the harness that compares methods on new hospitals (`compare`, its TOML files here),
the lever study (`levers`), the privacy audit (`privacy_audit`), all through the apps' own functions
(`local_loop`: the ClientApp's `train_round` and the strategy's outer step, without the transport)."""
