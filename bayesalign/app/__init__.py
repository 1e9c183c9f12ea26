"""The front door: the ``bayesalign`` command (`cli`), the demo and the plots."""
