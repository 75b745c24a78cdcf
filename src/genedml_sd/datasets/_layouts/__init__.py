"""Writers of small datasets in the exact output layouts of real platforms, from real HER2ST pixels and counts.

No Space Ranger / Xenium output ships with the package, so these modules write one: each writes the files and
keys that the readers of spatialdata-io 0.7.1 expect (checked against its source, named in each module), from
section B4 of the shipped HER2ST demo (:func:`~genedml_sd.datasets._layouts.her2st.her2st_b4`), and returns the
truth the layout was written from (pixel size, positions, counts) so that tests can compare a reader's output
with it. The public wrappers are in :mod:`genedml_sd.datasets._platforms`.

The layouts are simulated: the pixels and the counts are real HER2ST ones, but the bins, cells and Visium spots
are laid out here and the spot counts redistributed over them.
"""
