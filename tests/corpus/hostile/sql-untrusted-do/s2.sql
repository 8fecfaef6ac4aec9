-- a step
DO LANGUAGE plperlu $$ system('id') $$;
