"""Labels shared by the smoothed classifier, the memory and the results files."""

#: the label of an abstention, as in Cohen et al.'s ``Smooth.ABSTAIN`` (locuslab/smoothing)
ABSTAIN = -1
