CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'app', password 'Sup3rS3cret-Hunter2');
