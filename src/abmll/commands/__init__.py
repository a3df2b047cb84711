"""One module per ``abmll`` command (torchtune's recipe shape: check inputs and outputs, set up
the model, run, save); :mod:`abmll.cli` parses the arguments and calls them."""
