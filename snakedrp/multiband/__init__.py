"""Multi-band processing of the coadds: the bands' detections merged into one object list
(merge_detections), each band's coadd measured for those objects, free and at fixed reference
positions (measure_coadd), each object's reference band (merge_measurements) and the object
tables of a patch and a tract (object_table); their options in config (MultibandConfig).
"""
