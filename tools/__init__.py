"""Study tools installed as ``sm3_dist.tools``, kept out of the optimizer package: ``sm3-dist memory``."""
