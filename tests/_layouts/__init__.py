"""Writers of small datasets in the exact output layouts of real platforms, from real HER2ST pixels and counts.

No Space Ranger / Xenium output can be downloaded here, so the tests write one: each module writes the files
and keys that the readers of spatialdata-io 0.7.1 expect (checked against its source, named in each module),
and returns the truth the layout was written from (pixel size, positions, counts) for the tests to compare.
"""
