"""What every process of the node does alike: the sd_notify protocol, starting serve's child
processes, logging."""
