"""The launcher (`python -m simulations.run`) and its Flower helpers (`flower_env`): a private local
SuperLink, Flower's simulation engine, process supervision."""
