-- Orthanc routing rule: send every stable CT series to preannot (declared in DicomModalities as
-- "preannot"). Results coming back (SEG, SR) are not CT, so they are not forwarded again.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    print('routing CT series ' .. seriesId .. ' to preannot')
    RestApiPost('/modalities/preannot/store', seriesId, true)
  end
end
